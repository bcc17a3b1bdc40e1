"""Latency of the predictor pipeline on one real 640x480 image, stage by stage.

Cases, run interleaved (one run of every case per repeat, so background load hits them alike):

- ``A proposals SharpMask``: full-image proposals over the papers' 7 scales, top-100 windows refined by
  SharpMask; stages ``features`` (trunk + dense DeepMask heads), ``top_windows``, ``window_logits``,
  ``paste`` (window logits to image masks) and ``polygons``; totals without and with polygons.
- ``A proposals DeepMask``: the same with the 56x56 DeepMask masks (``refine=False``).
- ``B first click``: a new image + ``segment`` of one positive click + polygon, as the server and workers
  do it: ``features`` are made without the trunk (``compute_features(trunk=False)``), and the click runs it
  on the block of each pyramid level its windows read (inside ``segment``).
- ``B first click, whole pyramid``: the same after the trunk over the whole pyramid (``features``), as
  before block trunks (and as after a warm-up, less its trunk time).
- ``B repeated click``: the same click on the cached features (``segment`` + polygon), its memoised result
  forgotten first (a new prompt costs that much).
- ``C box``: ``segment`` of the tight box of the same object on the cached features + polygon.
- ``C first box``: the box on a new image (features made without the trunk, which a box never reads).
- ``D pre-annotation``: ``detect()`` on a new image (checkpoints with a MultiPathNet; skipped with a note
  otherwise), stage by stage (``detection_candidates``' own timings, then ``label_candidates``):
  ``features``, ``proposals`` (``propose``: top_windows + refinement + paste), ``classify`` (MultiPathNet
  on the proposals' boxes), ``scoring+NMS`` (detection scores, mask NMS, threshold), ``polygons`` of the
  kept detections; ``detect`` (what ``detect()`` costs on cached features) and ``total``.

Every case runs once per trunk engine of ``--trunk-engines`` (``segmodels.trunk_engine``: PyTorch and
ONNX Runtime by default), interleaved, so the engines are compared side by side in one run.

The click is the interior point farthest from the boundary of the image's largest annotated object
(docs/targets.md). Medians, p90 and minima in ms after warm-up runs; a table is printed and JSON written.
A benchmark, never a pass/fail test. Usage::

    .venv/bin/python bench/bench_pipeline.py [--checkpoint DIR] [--repeats N] [--out FILE] [--threads N]
        [--score-threshold F] [--trunk-engines torch,onnxruntime]
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime
import torch

from backend.allocator import ALLOCATOR_ENV, ensure_allocator_env
from backend.settings import DEFAULT_DATA_DIR
from segmodels.device import resolve_device
from segmodels.geometry import coco_segmentation_to_mask, mask_iou, mask_to_box
from segmodels.predictor import DEFAULT_CHECKPOINT, MaskPredictor, load_predictor
from segmodels.trunk_engine import ENGINES

REPO = Path(__file__).resolve().parents[1]
DATA = DEFAULT_DATA_DIR
DEFAULT_OUT = REPO / "bench" / "results" / "pipeline.json"
IMAGE_SIZE = (640, 480)  # width, height
RECORDED_ENV_PREFIXES = ("MALLOC_", "LD_PRELOAD", "OMP_", "MKL_", "KMP_", "GOMP_", "ONEDNN_", "DNNL_")

log = logging.getLogger("bench_pipeline")

Stages = dict[str, float]


@dataclass
class TimingRow:
    """Raw samples (ms) of one stage of one case, with the summary statistics reported for it.

    Warm-up times are kept apart (JSON only) to show how long the process takes to reach steady state.
    """

    engine: str
    case: str
    stage: str
    samples_ms: list[float] = field(default_factory=list)
    warmup_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(np.median(self.samples_ms))

    @property
    def p90(self) -> float:
        """90th percentile, linear interpolation between samples (numpy's default)."""
        return float(np.percentile(self.samples_ms, 90))

    @property
    def min(self) -> float:
        return float(np.min(self.samples_ms))

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "case": self.case,
            "stage": self.stage,
            "median_ms": self.median,
            "p90_ms": self.p90,
            "min_ms": self.min,
            "samples_ms": self.samples_ms,
            "warmup_ms": self.warmup_ms,
        }


@dataclass(frozen=True)
class Target:
    """A speed target of docs/targets.md, compared with the median of one measured (case, stage)."""

    what: str
    case: str
    stage: str
    target_ms: float
    note: str = ""


@dataclass
class Scene:
    """The benchmark input: the image and the prompts derived from its largest annotated object."""

    path: Path
    image: np.ndarray
    click: np.ndarray
    box: np.ndarray
    gt_mask: np.ndarray
    annotation: dict[str, Any]


CASE_SHARP, CASE_DEEP = "A proposals SharpMask", "A proposals DeepMask"
CASE_FIRST, CASE_REPEAT, CASE_BOX = "B first click", "B repeated click", "C box"
CASE_FIRST_WHOLE, CASE_FIRST_BOX = "B first click, whole pyramid", "C first box"
CASE_DETECT = "D pre-annotation"
# detect()'s defaults, which case D uses (the score threshold can be lowered with --score-threshold).
DETECT_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(MaskPredictor.detect).parameters.items()
    if p.default is not inspect.Parameter.empty
}
# The speed issue's CPU targets (2 cores): proposals 0.35 s, pre-annotation 0.5 s, a cold first click 180 ms.
TARGETS = (
    Target("full-image SharpMask proposals, top-100, 7 scales", CASE_SHARP, "total", 350.0),
    Target(
        "full pre-annotation (proposals + labels + polygons)",
        CASE_DETECT,
        "total",
        500.0,
        "detect() with its defaults on a new image, polygons of the kept detections",
    ),
    Target(
        "cold first click -> polygon p50 (nothing cached), in-process",
        CASE_FIRST,
        "total",
        180.0,
        "features of the new image (no trunk) + segment (the trunk on its blocks) + polygon",
    ),
    Target(
        "click -> polygon p50, cached features",
        CASE_REPEAT,
        "total",
        100.0,
        "target is through HTTP + Redis/RQ + worker; this is the in-process lower bound",
    ),
    Target(
        "box -> polygon p50, cached features",
        CASE_BOX,
        "total",
        100.0,
        "target is through HTTP + Redis/RQ + worker; this is the in-process lower bound",
    ),
)


# ---- process setup -----------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU, core counts, library versions and threads, and the allocator/threading environment."""
    cpuinfo = Path("/proc/cpuinfo")
    models = (
        [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        if cpuinfo.exists()
        else []
    )
    cpu_max = Path("/sys/fs/cgroup/cpu.max")
    return {
        "cpu_model": models[0] if models else platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cgroup_cpu_max": cpu_max.read_text().strip() if cpu_max.exists() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "onnxruntime": onnxruntime.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "opencv_threads": cv2.getNumThreads(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(RECORDED_ENV_PREFIXES)},
        "loadavg_start": os.getloadavg(),
    }


def git_info() -> dict[str, Any]:
    """Commit of the checkout and whether segmodels/ has uncommitted changes (None outside git)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        dirty = bool(git("status", "--porcelain", "segmodels"))
        return {"commit": git("rev-parse", "HEAD"), "segmodels_dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "segmodels_dirty": None}


def checkpoint_summary(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint path, config, stages and a summary of each training stage from its metadata."""
    training = meta.get("training") or {}
    keys = ("command", "seconds", "hardware", "final")
    return {
        "path": str(path.resolve()),
        "created": meta.get("created"),
        "stages": meta.get("stages"),
        "config": meta.get("config"),
        "training": {stage: {k: info.get(k) for k in keys} for stage, info in training.items()},
    }


# ---- input -------------------------------------------------------------------------------------------
def interior_point(mask: np.ndarray) -> np.ndarray:
    """Pixel (x, y) edge coordinates of the mask pixel farthest from the boundary (the image edge counts)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([col + 0.5, row + 0.5])


def load_scene(name: str) -> Scene:
    """The coco128 image ``name`` at exactly 640x480 with its largest non-crowd object's click and box."""
    path = DATA / "images" / name
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    coco = json.loads((DATA / "instances.json").read_text())
    info = next(im for im in coco["images"] if im["file_name"] == name)
    anns = [a for a in coco["annotations"] if a["image_id"] == info["id"] and not a.get("iscrowd")]
    if not anns:
        raise ValueError(f"{name} has no non-crowd annotation")
    ann = max(anns, key=lambda a: a["area"])
    mask = coco_segmentation_to_mask(ann["segmentation"], info["height"], info["width"])
    image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if image.shape[1::-1] != IMAGE_SIZE:
        image = cv2.resize(image, IMAGE_SIZE, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask.astype(np.uint8), IMAGE_SIZE, interpolation=cv2.INTER_NEAREST).astype(bool)
    return Scene(path, image, interior_point(mask), mask_to_box(mask).astype(np.float64), mask, ann)


# ---- cases -------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall time in ms (on a GPU, until its kernels have finished)."""
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) * 1e3


def run_proposals(pred: MaskPredictor, image: np.ndarray, k: int, refine: bool) -> Stages:
    """One full-image proposal pass timed stage by stage: features, ``propose`` (its own stage timings)
    and polygons."""
    t: Stages = {}
    feats, t["features"] = timed(lambda: pred.compute_features(image))
    pred.set_features(feats)
    masks = pred.propose(k, refine=refine, timings=t)
    _, t["polygons"] = timed(lambda: [m.polygon for m in masks])
    t["total"] = t["features"] + t["top_windows"] + t["window_logits"] + t["paste"]
    t["total+polygons"] = t["total"] + t["polygons"]
    return t


def run_prompt(
    pred: MaskPredictor, scene: Scene, click: bool, image: np.ndarray | None = None, trunk: bool = False
) -> Stages:
    """One prompt -> polygon: features of ``image`` first when it is given (with the trunk over the whole
    pyramid when ``trunk``), else on the predictor's cached ones."""
    t: Stages = {}
    if image is not None:
        feats, t["features"] = timed(lambda: pred.compute_features(image, trunk))
        pred.set_features(feats)
    # A new prompt each time, as an annotator's next click is: nothing from the memo of the last prompts.
    pred.features.prompt_masks.clear()
    prompt = {"points": [scene.click], "point_labels": [1]} if click else {"box": scene.box}
    mask, t["segment"] = timed(lambda: pred.segment(**prompt))
    _, t["polygon"] = timed(lambda: mask.polygon)
    t["total"] = sum(t.values())
    return t


def run_detect(pred: MaskPredictor, image: np.ndarray, k: int, threshold: float) -> Stages:
    """One pre-annotation pass on a new image: features, ``detect(score_threshold=threshold, proposals=k)``
    by stage, polygons of the detections."""
    t: Stages = {}
    feats, t["features"] = timed(lambda: pred.compute_features(image))
    pred.set_features(feats)
    candidates = pred.detection_candidates(k, timings=t)
    detections, labelling = timed(lambda: pred.label_candidates(candidates, threshold))
    t["scoring+NMS"] = t.pop("scoring") + labelling
    _, t["polygons"] = timed(lambda: [d.polygon for d in detections])
    t["detect"] = t["proposals"] + t["classify"] + t["scoring+NMS"]
    t["total"] = t["features"] + t["detect"] + t["polygons"]
    return t


def make_cases(
    pred: MaskPredictor, scene: Scene, k: int, threshold: float = DETECT_DEFAULTS["score_threshold"]
) -> dict[str, Callable[[], Stages]]:
    """The benchmark cases by name, each a callable running one timed pass (case D only when the
    checkpoint has a MultiPathNet; ``threshold`` is its score threshold)."""
    cached = pred.compute_features(scene.image)

    def on_cache(click: bool) -> Callable[[], Stages]:
        def run() -> Stages:
            pred.set_features(cached)
            return run_prompt(pred, scene, click)

        return run

    cases = {
        CASE_SHARP: lambda: run_proposals(pred, scene.image, k, refine=True),
        CASE_DEEP: lambda: run_proposals(pred, scene.image, k, refine=False),
        CASE_FIRST: lambda: run_prompt(pred, scene, click=True, image=scene.image),
        CASE_FIRST_WHOLE: lambda: run_prompt(pred, scene, click=True, image=scene.image, trunk=True),
        CASE_REPEAT: on_cache(click=True),
        CASE_BOX: on_cache(click=False),
        CASE_FIRST_BOX: lambda: run_prompt(pred, scene, click=False, image=scene.image),
    }
    if pred.model.multipathnet is not None:
        cases[CASE_DETECT] = lambda: run_detect(pred, scene.image, k, threshold)
    else:
        log.info("skipping %r: the checkpoint has no MultiPathNet", CASE_DETECT)
    return cases


def measure(cases: dict[tuple[str, str], Callable[[], Stages]], warmup: int, repeats: int) -> list[TimingRow]:
    """Warm-up, then ``repeats`` rounds of every (engine, case) in turn; one row per (engine, case, stage)."""
    rows: dict[tuple[str, str, str], TimingRow] = {}
    for i in range(warmup + repeats):
        if i < warmup:
            log.info("warm-up %d/%d", i + 1, warmup)
        else:
            log.info("repeat %d/%d", i - warmup + 1, repeats)
        for (engine, name), run in cases.items():
            gc.collect()
            for stage, ms in run().items():
                row = rows.setdefault((engine, name, stage), TimingRow(engine, name, stage))
                (row.warmup_ms if i < warmup else row.samples_ms).append(ms)
    return list(rows.values())


def sanity(
    pred: MaskPredictor, scene: Scene, k: int, threshold: float = DETECT_DEFAULTS["score_threshold"]
) -> dict[str, Any]:
    """Untimed checks that the outputs are plausible: prompt IoUs with the object, non-empty proposals,
    how the top-k windows spread over the pyramid levels (refinement is batched per level) and, with a
    MultiPathNet, case D's detections."""
    pred.set_image(scene.image)
    levels = np.bincount([c.level for c in pred.top_windows(k)], minlength=len(pred.scales))
    click = pred.segment(points=[scene.click], point_labels=[1])
    box = pred.segment(box=scene.box)
    props = pred.propose(k, refine=True)
    return {
        "click_iou": mask_iou(click.mask, scene.gt_mask),
        "box_iou": mask_iou(box.mask, scene.gt_mask),
        "proposals": len(props),
        "nonempty_proposals": sum(bool(m.mask.any()) for m in props),
        "top_k_per_level": levels.tolist(),
        "interactive_refine": pred.refine,
        **(detect_sanity(pred, k, threshold) if pred.model.multipathnet is not None else {}),
    }


def detect_sanity(pred: MaskPredictor, k: int, threshold: float) -> dict[str, Any]:
    """Case D's detections on the current image."""
    detections = pred.detect(score_threshold=threshold, proposals=k)
    return {
        "detections": len(detections),
        "detection_labels": [d.label for d in detections],
        "detection_scores": [d.score for d in detections],
    }


# ---- report ------------------------------------------------------------------------------------------
def target_report(rows: list[TimingRow], engines: list[str]) -> list[dict[str, Any]]:
    """Each target next to the measured median of its stage on each engine, with the ratio measured /
    target."""
    by_key = {(r.engine, r.case, r.stage): r for r in rows}
    out = []
    for engine in engines:
        for t in TARGETS:
            row = by_key.get((engine, t.case, t.stage))
            measured = row.median if row else None
            out.append(
                {
                    "engine": engine,
                    "what": t.what,
                    "case": t.case,
                    "stage": t.stage,
                    "target_ms": t.target_ms,
                    "measured_median_ms": measured,
                    "ratio": measured / t.target_ms if measured else None,
                    "note": t.note if row else f"not measured: case {t.case!r} was skipped",
                }
            )
    return out


def side_by_side(rows: list[TimingRow], engines: list[str]) -> dict[str, float]:
    """Ratios of medians measured in this run: SharpMask vs DeepMask proposals, new vs cached click (per
    engine), and each engine's total over the first engine's, case by case."""
    med = {(r.engine, r.case, r.stage): r.median for r in rows}
    ratios = {}
    for e in engines:
        ratios[f"{e}: sharpmask/deepmask proposals total"] = (
            med[e, CASE_SHARP, "total"] / med[e, CASE_DEEP, "total"]
        )
        ratios[f"{e}: first/repeated click total"] = (
            med[e, CASE_FIRST, "total"] / med[e, CASE_REPEAT, "total"]
        )
        if (e, CASE_DETECT, "total") in med:
            ratios[f"{e}: pre-annotation/SharpMask proposals total"] = (
                med[e, CASE_DETECT, "total"] / med[e, CASE_SHARP, "total"]
            )
    base = engines[0]
    for e in engines[1:]:
        cases = (CASE_SHARP, CASE_DEEP, CASE_FIRST, CASE_FIRST_WHOLE, CASE_REPEAT, CASE_BOX, CASE_FIRST_BOX)
        for case in (*cases, CASE_DETECT):
            if (base, case, "total") in med:
                ratios[f"{case} total: {e}/{base}"] = med[e, case, "total"] / med[base, case, "total"]
    return ratios


def format_table(header: list[str], lines: list[list[str]]) -> str:
    """Aligned text table; the first three columns left-aligned, the others right-aligned."""
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]

    def fmt(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def print_report(rows: list[TimingRow], targets: list[dict[str, Any]], ratios: dict[str, float]) -> None:
    """Stage table, targets table and side-by-side ratios on stdout."""
    stage_lines = [
        [r.engine, r.case, r.stage, *(f"{v:.1f}" for v in (r.median, r.p90, r.min)), str(len(r.samples_ms))]
        for r in rows
    ]
    print(format_table(["engine", "case", "stage", "median ms", "p90 ms", "min ms", "n"], stage_lines))
    print()
    print(
        format_table(
            ["engine", "target", "stage", "median ms", "target ms", "ratio"],
            [
                [
                    t["engine"],
                    t["what"],
                    t["stage"],
                    "skipped" if t["measured_median_ms"] is None else f"{t['measured_median_ms']:.1f}",
                    f"{t['target_ms']:.0f}",
                    "-" if t["ratio"] is None else f"{t['ratio']:.2f}",
                ]
                for t in targets
            ],
        )
    )
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")


# ---- main --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds of every case (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2, at least 2)")
    p.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all cores)"
    )
    p.add_argument("--image", default="000000000009.jpg", help="coco128 image file name")
    p.add_argument("--top-k", type=int, default=100, help="proposals kept (default 100)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument(
        "--trunk-engines",
        default="torch,onnxruntime",
        help="comma-separated trunk engines to compare (segmodels.trunk_engine; default torch,onnxruntime)",
    )
    p.add_argument(
        "--score-threshold",
        type=float,
        default=DETECT_DEFAULTS["score_threshold"],
        help=f"case D's detect() score threshold (default {DETECT_DEFAULTS['score_threshold']}, detect()'s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file (default bench/results/pipeline.json, "
        "or pipeline-no-allocator-env.json with --no-allocator-env)",
    )
    p.add_argument(
        "--no-allocator-env",
        action="store_true",
        help="run without the glibc MALLOC_*_THRESHOLD_ settings (re-executes if they are set)",
    )
    args = p.parse_args(argv)
    if args.warmup < 2 or args.repeats < 1:
        p.error("need --warmup >= 2 and --repeats >= 1")
    args.device = resolve_device(args.device)
    args.trunk_engines = args.trunk_engines.split(",")
    if unknown := set(args.trunk_engines) - set(ENGINES):
        p.error(f"unknown trunk engines {sorted(unknown)}: expected some of {', '.join(ENGINES)}")
    if args.device.type != "cpu":
        # ONNX Runtime runs the trunk on the CPU only (segmodels.trunk_engine): on a GPU, PyTorch alone.
        args.trunk_engines = ["torch"]
    if args.out is None:
        plain = DEFAULT_OUT.with_name("pipeline-no-allocator-env.json")
        args.out = plain if args.no_allocator_env else DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    reexecuted = ensure_allocator_env(use=not args.no_allocator_env)
    torch.set_num_threads(args.threads)
    scene = load_scene(args.image)
    log.info("image %s, click %s, box %s", scene.path.name, scene.click.tolist(), scene.box.tolist())
    engines = args.trunk_engines
    preds = {engine: load_predictor(args.checkpoint, args.device, trunk_engine=engine) for engine in engines}
    pred = preds[engines[0]]
    machine = machine_info()
    cases = {
        (engine, name): run
        for engine, p in preds.items()
        for name, run in make_cases(p, scene, args.top_k, args.score_threshold).items()
    }
    rows = measure(cases, args.warmup, args.repeats)
    targets, ratios = target_report(rows, engines), side_by_side(rows, engines)
    print_report(rows, targets, ratios)
    skipped = (
        {} if pred.model.multipathnet is not None else {CASE_DETECT: "the checkpoint has no MultiPathNet"}
    )
    for case, reason in skipped.items():
        print(f"skipped {case}: {reason}")
    result = {
        "benchmark": "pipeline",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.orig_argv[1:]],
        "git": git_info(),
        "machine": {**machine, "loadavg_end": os.getloadavg()},
        "allocator": {
            "tuned": not args.no_allocator_env,
            "reexecuted": reexecuted,
            "variables": {k: os.environ.get(k) for k in ALLOCATOR_ENV},
        },
        "checkpoint": checkpoint_summary(args.checkpoint, pred.metadata),
        "input": {
            "image": str(scene.path),
            "size": list(IMAGE_SIZE),
            "annotation_id": scene.annotation["id"],
            "category_id": scene.annotation["category_id"],
            "click_xy": scene.click.tolist(),
            "box_xyxy": scene.box.tolist(),
        },
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "device": str(args.device),
            "trunk_engines": engines,
            "top_k": args.top_k,
            "detect": {**DETECT_DEFAULTS, "score_threshold": args.score_threshold, "proposals": args.top_k},
            "scales": list(pred.scales),
            "percentile": "numpy linear interpolation",
        },
        "rows": [r.to_json() for r in rows],
        "targets": targets,
        "ratios": ratios,
        "skipped": skipped,
        "sanity": {e: sanity(p, scene, args.top_k, args.score_threshold) for e, p in preds.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
