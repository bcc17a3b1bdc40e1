"""Active learning on COCO128: does labelling the most uncertain images first beat labelling random ones?

The simulation of a Label Studio project that retrains after every batch of annotations, for each seed of
``--seeds``:

- the project's label set: ``--classes`` (five frequent COCO classes by default), category ids 1..N; its
  annotations are COCO128's instances of those classes (other objects stay unlabelled, as in a project);
- the starting model (shared by every seed): the shipped checkpoint with its MultiPathNet replaced by a
  fresh one for COCO128's *other* classes, trained ``--pretrain-steps`` label-stage steps on the pool's
  annotations of those (0: left fresh), because the shipped label heads were trained on the pool's labels;
- the pool: COCO128's train split (``image_id % 5 != 0``); the held-out set: the val split (``% 5 == 0``);
- a seed set of ``--seed-images`` random pool images (drawn by the seed); ``finetune`` from the starting
  model on it gives the round-0 model, shared by both strategies;
- then ``--rounds`` rounds per strategy: pick ``--k`` more pool images, the most uncertain first
  (``uncertainty.image_uncertainty`` for the project's classes under the current model, as rescore ranks
  tasks) or at random (drawn by the seed), and fine-tune the current model on every image labelled so far
  (what the retraining job does: the served model, all annotations);
- after every fine-tune: ``finetune.evaluate_checkpoint`` on the held-out images (one-click mIoU; label top-1
  on the GT boxes, by class name), plus the majority-class baseline.

Output: per strategy and round the mean, std and min/max over the seeds; the verdict (per seed, uncertainty
minus random label top-1 averaged over the rounds, then its mean and spread over the seeds); a figure with
the min-max range shaded. Seeds can run as separate processes and be merged with ``--combine``; every row is
written to ``--out`` as soon as it is measured, so an interrupted run keeps its finished rounds.

Caveat: DeepMask and SharpMask in the shipped checkpoint were trained on the pool's masks, so click mIoU can
only show whether fine-tuning hurts masks, not what new masks teach (bench/README.md).

    .venv/bin/python bench/bench_active_learning.py [--seeds 0,1,2] [--rounds 3] [--k 5] [--seed-images 10]
    .venv/bin/python bench/bench_active_learning.py --combine a.json b.json c.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from bench_pipeline import git_info, machine_info

from backend.allocator import ensure_allocator_env
from backend.settings import DEFAULT_DATA_DIR
from segmodels.checkpoint import load_checkpoint, save_checkpoint
from segmodels.data import CocoInstances
from segmodels.finetune import FinetuneConfig, evaluate_checkpoint, finetune, heldout_instances
from segmodels.predictor import DEFAULT_CHECKPOINT, load_predictor
from segmodels.splits import in_split
from segmodels.uncertainty import TOP_OBJECTS, image_uncertainty

REPO = Path(__file__).resolve().parents[1]
DATA = DEFAULT_DATA_DIR
RESULTS = REPO / "bench" / "results"
CLASSES = ("person", "chair", "cup", "dining table", "potted plant")
STRATEGIES = ("uncertainty", "random")
PRETRAIN_STEPS = 600


log = logging.getLogger("bench_active_learning")


def write_subset(data: Path, classes: list[str], root: Path) -> Path:
    """A COCO directory with the annotations of ``classes`` only, as categories 1..N in that order; the
    images are a link to ``data/images``."""
    coco = json.loads((data / "instances.json").read_text())
    missing = set(classes) - {c["name"] for c in coco["categories"]}
    if missing:
        raise ValueError(f"classes {sorted(missing)} are not in {data}")
    new_id = {c["id"]: classes.index(c["name"]) + 1 for c in coco["categories"] if c["name"] in classes}
    subset = {
        "images": coco["images"],
        "annotations": [
            {**a, "category_id": new_id[a["category_id"]]}
            for a in coco["annotations"]
            if a["category_id"] in new_id
        ],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "instances.json").write_text(json.dumps(subset))
    (root / "images").symlink_to((data / "images").resolve())
    return root


def starting_checkpoint(
    shipped: Path, data: Path, project_classes: list[str], pool: list[int], steps: int, work: Path
) -> Path:
    """A model that knows COCO128's other classes but not the project's: the shipped checkpoint with a fresh
    MultiPathNet (random towers and classifier) for every other class, trained (``steps``, label stage only)
    on the pool images' annotations of those classes."""
    coco = json.loads((data / "instances.json").read_text())
    others = [c["name"] for c in coco["categories"] if c["name"] not in project_classes]
    torch.manual_seed(0)
    model, meta = load_checkpoint(shipped)
    model.set_classes(others, list(range(1, len(others) + 1)))
    note = "bench_active_learning: MultiPathNet re-initialised for the classes outside the project"
    fresh = save_checkpoint(
        model, work / "fresh", {"stages": meta["stages"], "training": meta["training"], "note": note}
    )
    cfg = FinetuneConfig(
        train_deepmask=False,
        train_sharpmask=False,
        train_clicks=False,
        train_quality=False,
        multipathnet_steps=steps,
        device="cpu",
    )
    return finetune(fresh, write_subset(data, others, work / "others"), work / "start", cfg, pool)


def rank_by_uncertainty(
    checkpoint: Path, dataset: CocoInstances, image_ids: list[int], classes: list[str], top: int
) -> list[tuple[int, float]]:
    """``(image id, uncertainty)`` under ``checkpoint`` for a project labelling ``classes`` (what rescore
    passes), the image scored by its ``top`` most uncertain objects, most uncertain first."""
    predictor = load_predictor(checkpoint)
    index_of = {im["id"]: i for i, im in enumerate(dataset.images)}
    scores = []
    for image_id in image_ids:
        predictor.set_image(dataset.image(index_of[image_id]))
        scores.append((image_id, image_uncertainty(predictor, classes=classes, top=top)["uncertainty"]))
    return sorted(scores, key=lambda s: -s[1])


def majority_baseline(heldout: CocoInstances) -> dict:
    """Label top-1 of always answering the held-out set's most common class."""
    labels = [inst.category_id for insts in heldout_instances(heldout) for inst in insts]
    category, count = Counter(labels).most_common(1)[0]
    return {"class": heldout.categories[category], "label_top1": count / len(labels), "label_n": len(labels)}


class Simulation:
    """The rounds of one run: fine-tunes, evaluations and picks, recorded as rows."""

    def __init__(self, project: Path, work: Path, cfg: FinetuneConfig, args: argparse.Namespace) -> None:
        self.project, self.work, self.cfg, self.args = project, work, cfg, args
        self.classes = [c.strip() for c in args.classes.split(",")]
        self.dataset = CocoInstances(project, "all")
        self.heldout = CocoInstances(project, "val")
        self.setting = {
            "classes": self.classes,
            "top_objects": args.top_objects,
            "finetune_config": asdict(cfg),
            "majority_baseline": majority_baseline(self.heldout),
        }
        self.pool = sorted(im["id"] for im in self.dataset.images if in_split(im["id"], "train"))
        self.instances_of = Counter(
            self.dataset.images[inst.image_index]["id"] for inst in self.dataset.instances
        )
        self.rows: list[dict] = []

    def evaluate(
        self, seed: int, strategy: str, round_: int, checkpoint: Path, labelled: list[int], extra: dict
    ) -> None:
        start = time.monotonic()
        metrics = evaluate_checkpoint(checkpoint, self.heldout, "cpu")
        row = {
            "seed": seed,
            "strategy": strategy,
            "round": round_,
            "images": len(labelled),
            "instances": sum(self.instances_of[i] for i in labelled),
            "click_miou": metrics["click_miou"],
            "label_top1": metrics["label_top1"],
            "eval_seconds": time.monotonic() - start,
            **extra,
        }
        log.info(
            "%s", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if k != "picked"}
        )
        self.rows.append(row)
        # Every row as soon as it is measured: an interrupted run still leaves its finished rounds.
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps({"partial": True, **self.setting, "rows": self.rows}, indent=2))

    def tune(self, init: Path, name: str, labelled: list[int]) -> tuple[Path, float]:
        start = time.monotonic()
        out = finetune(init, self.project, self.work / name, self.cfg, sorted(labelled))
        return out, time.monotonic() - start

    def pick(self, strategy: str, model: Path, labelled: list[int], rng: np.random.Generator) -> tuple:
        """``k`` new images from the rest of the pool, the seconds the choice took, the ranking's scores."""
        start = time.monotonic()
        rest = [i for i in self.pool if i not in labelled]
        if strategy == "random":
            picked = sorted(int(i) for i in rng.choice(rest, self.args.k, replace=False))
            return picked, time.monotonic() - start, None
        ranking = rank_by_uncertainty(model, self.dataset, rest, self.classes, self.args.top_objects)
        picked = [i for i, _ in ranking[: self.args.k]]
        return picked, time.monotonic() - start, [u for _, u in ranking]

    def run(self, start_model: Path, seed: int) -> None:
        """One seed: the seed set's round 0, then each strategy's rounds; ``seed`` draws the seed set and
        the random strategy."""
        args = self.args
        seed_ids = sorted(
            int(i) for i in np.random.default_rng(seed).choice(self.pool, args.seed_images, replace=False)
        )
        model0, seconds = self.tune(start_model, f"s{seed}-round0", seed_ids)
        self.evaluate(seed, "seed", 0, model0, seed_ids, {"picked": seed_ids, "finetune_seconds": seconds})
        for strategy in STRATEGIES:
            rng = np.random.default_rng(seed + 1)
            model, labelled = model0, list(seed_ids)
            for round_ in range(1, args.rounds + 1):
                picked, pick_seconds, scores = self.pick(strategy, model, labelled, rng)
                labelled += picked
                model, seconds = self.tune(model, f"s{seed}-{strategy}{round_}", labelled)
                extra = {
                    "picked": picked,
                    "picked_without_project_objects": sum(self.instances_of[i] == 0 for i in picked),
                    "pick_seconds": pick_seconds,
                    "finetune_seconds": seconds,
                }
                if scores is not None:
                    extra["uncertainty_picked"] = scores[: args.k]
                    extra["uncertainty_pool_median"] = float(np.median(scores))
                self.evaluate(seed, strategy, round_, model, labelled, extra)


METRICS = ("images", "instances", "label_top1", "click_miou")


def curves(rows: list[dict]) -> list[dict]:
    """Per strategy and round, each metric's mean, std (population) and min/max over the seeds; round 0 of
    each strategy is the seed set (and "start" the starting model)."""
    out = []
    for strategy in ("start", "seed", *STRATEGIES):
        for round_ in sorted({r["round"] for r in rows if r["strategy"] == strategy}):
            runs = [r for r in rows if r["strategy"] == strategy and r["round"] == round_]
            stats = {}
            for key in METRICS:
                values = np.array([r[key] for r in runs], float)
                stats[key] = {
                    "mean": float(values.mean()),
                    "std": float(values.std()),
                    "min": float(values.min()),
                    "max": float(values.max()),
                }
            out.append({"strategy": strategy, "round": round_, "seeds": len(runs), **stats})
    return out


def verdict(rows: list[dict]) -> dict:
    """Does uncertainty beat random? Per seed, the mean over rounds 1..R of (uncertainty - random) label
    top-1 (the area between the curves per round, rounds both strategies finished); then its mean, std and
    min/max over the seeds, and how many seeds uncertainty won, tied, lost."""
    by = {(r["seed"], r["strategy"], r["round"]): r["label_top1"] for r in rows}
    pairs = {
        (s, n): by[(s, "uncertainty", n)] - by[(s, "random", n)]
        for s, strategy, n in by
        if strategy == "uncertainty" and (s, "random", n) in by
    }
    seeds = sorted({s for s, _ in pairs})
    diffs = np.array([np.mean([d for (s, _), d in pairs.items() if s == seed]) for seed in seeds])
    picked_empty = {
        strategy: sum(r.get("picked_without_project_objects", 0) for r in rows if r["strategy"] == strategy)
        for strategy in STRATEGIES
    }
    picked = {
        strategy: sum(len(r["picked"]) for r in rows if r["strategy"] == strategy) for strategy in STRATEGIES
    }
    return {
        "label_top1_gain_per_seed": {str(s): float(d) for s, d in zip(seeds, diffs, strict=True)},
        "label_top1_gain_mean": float(diffs.mean()),
        "label_top1_gain_std": float(diffs.std()),
        "label_top1_gain_min": float(diffs.min()),
        "label_top1_gain_max": float(diffs.max()),
        "seeds_won_tied_lost": [int((diffs > 0).sum()), int((diffs == 0).sum()), int((diffs < 0).sum())],
        "picked_without_project_objects": {s: [picked_empty[s], picked[s]] for s in STRATEGIES},
    }


def table(summary: list[dict], baseline: dict, won: dict) -> str:
    """The curves as aligned text (mean ± std [min, max] over the seeds), then the verdict."""
    head = ["strategy", "round", "seeds", "images", "instances", "label top-1", "click mIoU"]

    def cell(stat: dict, digits: int) -> str:
        mean, std, low, high = (f"{stat[k]:.{digits}f}" for k in ("mean", "std", "min", "max"))
        return f"{mean} ± {std} [{low}, {high}]"

    lines = [head]
    for r in summary:
        lines.append(
            [
                r["strategy"],
                str(r["round"]),
                str(r["seeds"]),
                f"{r['images']['mean']:.0f}",
                cell(r["instances"], 0),
                cell(r["label_top1"], 3),
                cell(r["click_miou"], 3),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in lines
    ]
    text.append(
        f"majority-class baseline ({baseline['class']}): label top-1 {baseline['label_top1']:.3f} "
        f"on {baseline['label_n']} held-out instances"
    )
    empty = won["picked_without_project_objects"]
    text.append(
        f"uncertainty - random, label top-1 averaged over rounds 1..R: {won['label_top1_gain_mean']:+.3f} "
        f"± {won['label_top1_gain_std']:.3f} [{won['label_top1_gain_min']:+.3f}, "
        f"{won['label_top1_gain_max']:+.3f}] over seeds; won/tied/lost {won['seeds_won_tied_lost']}; "
        "picks without a project object: " + ", ".join(f"{s} {n}/{of}" for s, (n, of) in empty.items())
    )
    return "\n".join(text)


def plot(summary: list[dict], baseline: dict, path: Path) -> None:
    """Label top-1 and click mIoU against the number of labelled images: each strategy's mean over the seeds
    with its min-max range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = [r for r in summary if r["strategy"] == "seed"]
    seeds = seed[0]["seeds"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in (
        (axes[0], "label_top1", "label top-1 (held-out)"),
        (axes[1], "click_miou", "one-click mIoU (held-out)"),
    ):
        for strategy, style in zip(STRATEGIES, ("o-", "s--"), strict=True):
            curve = seed + [r for r in summary if r["strategy"] == strategy]
            x = [r["images"]["mean"] for r in curve]
            lines = ax.plot(x, [r[key]["mean"] for r in curve], style, label=f"{strategy} (mean)")
            ax.fill_between(
                x,
                [r[key]["min"] for r in curve],
                [r[key]["max"] for r in curve],
                color=lines[0].get_color(),
                alpha=0.2,
                label=f"{strategy} (min-max)",
            )
        start = next(r for r in summary if r["strategy"] == "start")
        ax.axhline(start[key]["mean"], color="grey", linestyle=":", label="starting model")
        if key == "label_top1":
            ax.axhline(
                baseline["label_top1"], color="red", linestyle=":", label=f"always {baseline['class']}"
            )
        ax.set_xlabel("labelled images")
        ax.set_title(f"{title}, {seeds} seeds")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds after the seed set (default 3)")
    p.add_argument("--k", type=int, default=5, help="images labelled per round (default 5)")
    p.add_argument("--seed-images", type=int, default=10, help="random images labelled first (default 10)")
    p.add_argument(
        "--seeds", default="0,1,2", help="comma-separated seeds of the seed set and of the random strategy"
    )
    p.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        help="no simulation: merge the runs of these JSON outputs (e.g. one seed each, run in parallel)",
    )
    p.add_argument(
        "--top-objects",
        type=int,
        default=TOP_OBJECTS,
        help=f"an image scores the mean of its this many most uncertain objects (default {TOP_OBJECTS}; "
        "100, every candidate: ranks by the sum, the expected number of wrong labels)",
    )
    p.add_argument("--classes", default=",".join(CLASSES), help="the project's label set, comma-separated")
    p.add_argument("--data", type=Path, default=DATA, help="COCO128 directory")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="the shipped checkpoint")
    p.add_argument("--out", type=Path, default=RESULTS / "active_learning.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "active_learning.png")
    p.add_argument("--work", type=Path, default=None, help="where checkpoints go (default: a temporary dir)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--no-allocator-env", action="store_true", help="without the tuned glibc allocator")
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=PRETRAIN_STEPS,
        help=f"MultiPathNet steps on the other classes for the starting model (default {PRETRAIN_STEPS})",
    )
    defaults = FinetuneConfig()
    for stage in ("deepmask", "sharpmask", "click", "quality", "multipathnet"):
        default = getattr(defaults, f"{stage}_steps")
        p.add_argument(
            f"--{stage}-steps", type=int, default=default, help=f"finetune steps (default {default})"
        )
    return p.parse_args(argv)


def simulate(args: argparse.Namespace) -> dict:
    """Every seed of ``args.seeds`` from one starting model; the report without its summary."""
    machine = machine_info()
    started = time.monotonic()
    classes = [c.strip() for c in args.classes.split(",")]
    cfg = FinetuneConfig(
        deepmask_steps=args.deepmask_steps,
        sharpmask_steps=args.sharpmask_steps,
        click_steps=args.click_steps,
        quality_steps=args.quality_steps,
        multipathnet_steps=args.multipathnet_steps,
        device="cpu",
    )
    with tempfile.TemporaryDirectory(prefix="segmask-al-") as tmp:
        work = args.work or Path(tmp)
        project = write_subset(args.data, classes, work / "project")
        sim = Simulation(project, work, cfg, args)
        pretrain_started = time.monotonic()
        start = starting_checkpoint(args.checkpoint, args.data, classes, sim.pool, args.pretrain_steps, work)
        pretrain_seconds = time.monotonic() - pretrain_started
        seeds = [int(s) for s in args.seeds.split(",")]
        sim.evaluate(seeds[0], "start", 0, start, [], {"picked": []})
        for seed in seeds:
            sim.run(start, seed)
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **sim.setting,
        "pool_images": len(sim.pool),
        "heldout_images": len(sim.heldout),
        "rows": sim.rows,
        "pretrain_seconds": pretrain_seconds,
        "seconds": time.monotonic() - started,
        "machine": {**machine, "loadavg_end": os.getloadavg()},
        "git": git_info(),
    }


def combine(paths: list[Path]) -> dict:
    """One report from the outputs of several runs of the same configuration (their rows; each run's
    arguments, seconds and machine kept under ``parts``). A run's partial output (the rows it had finished)
    counts; the report then says ``partial``."""
    parts = [json.loads(path.read_text()) for path in paths]
    for part in parts[1:]:
        same = ("classes", "top_objects", "finetune_config", "majority_baseline")
        if any(part.get(key) != parts[0].get(key) for key in same):
            raise ValueError(f"{paths}: the runs differ in {same}")
    keep = ("args", "seconds", "pretrain_seconds", "machine", "git", "partial")
    return {
        **{k: v for k, v in parts[0].items() if k not in keep and k != "parts"},
        "partial": any(part.get("partial", False) for part in parts),
        "rows": [row for part in parts for row in part["rows"]],
        "parts": [
            {"path": str(path), **{k: part[k] for k in keep if k in part}}
            for path, part in zip(paths, parts, strict=True)
        ],
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.combine:
        report = combine(args.combine)
    else:
        ensure_allocator_env(use=not args.no_allocator_env)
        torch.set_num_threads(args.threads)
        report = simulate(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")  # the rows, should the summary fail
    report["curves"] = curves(report["rows"])
    report["verdict"] = verdict(report["rows"])
    print(table(report["curves"], report["majority_baseline"], report["verdict"]))
    if "seconds" in report:
        print(f"total {report['seconds']:.0f} s")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report["curves"], report["majority_baseline"], args.plot)
    log.info("wrote %s and %s", args.out, args.plot)


if __name__ == "__main__":
    main()
