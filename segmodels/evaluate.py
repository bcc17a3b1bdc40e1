"""``segmask evaluate``: interactive and proposal quality of a checkpoint on a split of a COCO-format dataset.

The protocol of docs/targets.md and docs/papers.md, measured on the split's images (``splits.in_split``), one
module per part:

- clicks, box, baselines (eval_interactive.py): the simulated annotator of interactive segmentation
  (annotator.py, the RITM protocol) from one click or the tight GT box, then corrective clicks, on the
  non-crowd instances with area > 32^2 px; the filled GT box and OpenCV GrabCut (baselines.py) on the same
  instances;
- proposals (eval_proposals.py): class-agnostic AR@10/100/1000 (coco_scoring.py) of the top-k windows of
  ``MaskPredictor.propose``;
- patches (eval_patches.py): the papers' evalPerPatch, mean mask IoU and success@.5/.7 on fixed-seed
  jittered windows;
- labels (eval_labels.py; checkpoints with a MultiPathNet): top-1 accuracy of ``MaskPredictor.classify`` on
  the GT masks;
- detection (eval_detection.py; same): COCO AP of ``MaskPredictor.detect`` with categories, pre-annotation
  precision and recall at the default threshold (and per cap on detections per image), the scores'
  reliability diagram and expected calibration error, before (uncalibrated, one per image) and after.

The report (eval_report.py) writes ``metrics.json``, ``table.txt``, ``report.md`` and its figures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import cv2
import torch

from segmodels.baselines import GRABCUT_ITERATIONS
from segmodels.data import CocoInstances
from segmodels.eval_detection import DETECTION_MAX, DETECTION_THRESHOLD, evaluate_detection
from segmodels.eval_interactive import (
    LARGE_AREA,
    MAX_CLICKS,
    MIN_AREA,
    InstanceResult,
    convergence,
    evaluate_instances,
    summarise,
)
from segmodels.eval_labels import FREQUENT_CLASS, evaluate_labels, label_summary
from segmodels.eval_patches import PATCH_SEED, evaluate_patches
from segmodels.eval_proposals import evaluate_proposals
from segmodels.eval_report import write_report
from segmodels.predictor import DEFAULT_CHECKPOINT, Detection, MaskPredictor, load_predictor

log = logging.getLogger(__name__)

PARTS = ("clicks", "box", "baselines", "proposals", "patches", "labels", "detection")
# The parts that need the checkpoint's MultiPathNet (skipped with a note without one).
LABEL_PARTS = ("labels", "detection")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict:
    """What the timings ran on: CPU, threads, device, GPU and library versions."""
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "opencv": cv2.__version__,
        "platform": platform.platform(),
    }


def protocol(predictor: MaskPredictor, detection_proposals: int) -> dict:
    """The settings the numbers depend on, recorded in ``metrics["protocol"]``."""
    return {
        "min_area": MIN_AREA,
        "large_area": LARGE_AREA,
        "max_clicks": MAX_CLICKS,
        "box_threshold_logit": predictor.box_threshold_logit,
        "box_steps": predictor.box_steps,
        "box_grabcut": predictor.box_grabcut,
        "first_click_steps": predictor.first_click_steps,
        "first_click_context": predictor.first_click_context,
        "first_click_head": predictor.model.first_click_head is not None,
        "correction_steps": predictor.correction_steps,
        "grabcut_iterations": GRABCUT_ITERATIONS,
        "mask_threshold_logit": predictor.threshold_logit,
        "scales": list(predictor.scales),
        "refined": predictor.refine,
        "patch_seed": PATCH_SEED,
        "label_frequent_class": FREQUENT_CLASS,
        "detection": {
            "score_threshold": DETECTION_THRESHOLD,
            "max_detections": DETECTION_MAX,
            "proposals": detection_proposals,
            "calibration": None if predictor.calibration is None else predictor.calibration.fit.get("model"),
        },
    }


@contextlib.contextmanager
def timed(seconds: dict[str, float], part: str) -> Iterator[None]:
    """Record the wall-clock seconds of the block in ``seconds[part]``."""
    start = time.perf_counter()
    yield
    seconds[part] = time.perf_counter() - start


def instance_metrics(results: list[InstanceResult], feature_seconds: list[float]) -> dict:
    """``metrics["instances"]``: the clicks/box/baselines summaries and every instance's result."""
    return {
        "n": len(results),
        "median_feature_seconds": statistics.median(feature_seconds) if feature_seconds else None,
        "grabcut_fallbacks": sum(r.grabcut_fallback for r in results),
        "summary": summarise(results),
        "convergence": convergence(results),
        "results": [r.to_json() for r in results],
    }


def evaluate(
    data: str | Path,
    split: str,
    out: str | Path,
    checkpoint: str | Path | None = None,
    max_images: int | None = None,
    skip: Iterable[str] = (),
    proposals_k: int = 1000,
    patches: int = 1000,
    device: str = "cpu",
    command: str = "",
    detection_proposals: int = 100,
) -> dict:
    """Run every part not in ``skip`` (:data:`PARTS`) on the first ``max_images`` images (by id) of ``split``;
    write ``metrics.json``, ``table.txt``, ``report.md`` and the figures to ``out``; return the metrics.

    ``labels`` and ``detection`` run only when the checkpoint has a MultiPathNet (otherwise they are noted
    in ``metrics["skipped"]``); ``detection_proposals``: refined windows ``detect`` classifies per image."""
    unknown = set(skip) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts to skip {sorted(unknown)}; choose from {PARTS}")
    parts = set(PARTS) - set(skip)
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    predictor = load_predictor(checkpoint, device)
    skipped: dict[str, str] = {}
    if predictor.model.multipathnet is None and parts & set(LABEL_PARTS):
        for part in sorted(parts & set(LABEL_PARTS)):
            skipped[part] = "the checkpoint has no MultiPathNet"
        log.info("skipping %s: the checkpoint has no MultiPathNet", ", ".join(sorted(skipped)))
        parts -= set(LABEL_PARTS)
    dataset = CocoInstances(data, split)
    image_indices = sorted(range(len(dataset)), key=lambda i: dataset.images[i]["id"])[:max_images]
    log.info(
        "evaluating %s on %d %s images: %s",
        checkpoint or DEFAULT_CHECKPOINT,
        len(image_indices),
        split,
        ", ".join(sorted(parts)),
    )
    seconds: dict[str, float] = {}
    metrics: dict = {
        "command": command,
        "checkpoint": str(Path(checkpoint or DEFAULT_CHECKPOINT).resolve()),
        "checkpoint_stages": predictor.metadata.get("stages", []),
        "checkpoint_training": predictor.metadata.get("training", {}),
        "data": str(Path(data).resolve()),
        "split": split,
        "image_ids": [dataset.images[i]["id"] for i in image_indices],
        "hardware": hardware(predictor.device),
        "protocol": protocol(predictor, detection_proposals),
        "skipped": skipped,
        "seconds": seconds,
    }
    results: list[InstanceResult] = []
    examples: dict[int, list[tuple[dict, float]]] = {}
    detection_examples: dict[int, tuple[list[Detection], float | None]] = {}
    if parts & {"clicks", "box", "baselines"}:
        with timed(seconds, "instances"):
            results, feature_seconds = evaluate_instances(predictor, dataset, image_indices, parts)
            metrics["instances"] = instance_metrics(results, feature_seconds)
    if "proposals" in parts:
        with timed(seconds, "proposals"):
            metrics["proposals"], examples = evaluate_proposals(
                predictor, dataset, image_indices, proposals_k
            )
    if "patches" in parts:
        with timed(seconds, "patches"):
            metrics["patches"] = evaluate_patches(predictor, dataset, patches)
    if "labels" in parts:
        with timed(seconds, "labels"):
            labels = evaluate_labels(predictor, dataset, image_indices)
            metrics["labels"] = {
                **label_summary(labels, dataset.categories),
                "results": [asdict(r) for r in labels],
            }
    if "detection" in parts:
        with timed(seconds, "detection"):
            metrics["detection"], detection_examples = evaluate_detection(
                predictor, dataset, image_indices, detection_proposals
            )
    seconds["total"] = time.perf_counter() - started
    write_report(out, metrics, predictor, dataset, results, examples, detection_examples)
    log.info("wrote %s", out)
    return metrics
