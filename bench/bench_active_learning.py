"""Active learning on COCO128: does labelling the most uncertain images first beat labelling random ones?

The simulation of a Label Studio project that retrains after every batch of annotations:

- the project's label set: ``--classes`` (five frequent COCO classes by default), category ids 1..N; its
  annotations are COCO128's instances of those classes (other objects stay unlabelled, as in a project);
- the starting model: the shipped checkpoint with its MultiPathNet replaced by a fresh one for the project's
  classes (random towers and classifier), because the shipped label heads were trained on the pool's labels;
- the pool: COCO128's train split (``image_id % 5 != 0``); the held-out set: the val split (``% 5 == 0``);
- a seed set of ``--seed-images`` random pool images; ``finetune`` (default configuration) from the starting
  model on it gives the round-0 model, shared by both strategies;
- then ``--rounds`` rounds per strategy: pick ``--k`` more pool images, the most uncertain first
  (``uncertainty.image_uncertainty`` under the current model) or at random, and fine-tune the current model
  on every image labelled so far (what the retraining job does: the served model, all annotations);
- after every fine-tune: ``finetune.evaluate_checkpoint`` on the held-out images (one-click mIoU; label top-1
  on the GT boxes, by class name), plus the majority-class baseline.

Caveat: DeepMask and SharpMask in the shipped checkpoint were trained on the pool's masks, so click mIoU can
only show whether fine-tuning hurts masks, not what new masks teach (bench/README.md).

    .venv/bin/python bench/bench_active_learning.py [--rounds 3] [--k 5] [--seed-images 10] [--seed 0]
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
from bench_pipeline import ensure_allocator_env, git_info, machine_info

from backend.settings import DEFAULT_DATA_DIR
from segmodels.checkpoint import load_checkpoint, save_checkpoint
from segmodels.data import CocoInstances, in_split
from segmodels.finetune import FinetuneConfig, evaluate_checkpoint, finetune, heldout_instances
from segmodels.predictor import DEFAULT_CHECKPOINT, load_predictor
from segmodels.uncertainty import image_uncertainty

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
    cfg = FinetuneConfig(train_deepmask=False, train_sharpmask=False, multipathnet_steps=steps, device="cpu")
    return finetune(fresh, write_subset(data, others, work / "others"), work / "start", cfg, pool)


def rank_by_uncertainty(
    checkpoint: Path, dataset: CocoInstances, image_ids: list[int]
) -> list[tuple[int, float]]:
    """``(image id, uncertainty)`` under ``checkpoint``, most uncertain first."""
    predictor = load_predictor(checkpoint)
    index_of = {im["id"]: i for i, im in enumerate(dataset.images)}
    scores = []
    for image_id in image_ids:
        predictor.set_image(dataset.image(index_of[image_id]))
        scores.append((image_id, image_uncertainty(predictor)["uncertainty"]))
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
        self.dataset = CocoInstances(project, "all")
        self.heldout = CocoInstances(project, "val")
        self.pool = sorted(im["id"] for im in self.dataset.images if in_split(im["id"], "train"))
        self.instances_of = Counter(
            self.dataset.images[inst.image_index]["id"] for inst in self.dataset.instances
        )
        self.rows: list[dict] = []

    def evaluate(
        self, strategy: str, round_: int, checkpoint: Path, labelled: list[int], extra: dict
    ) -> None:
        start = time.monotonic()
        metrics = evaluate_checkpoint(checkpoint, self.heldout, "cpu")
        row = {
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
        ranking = rank_by_uncertainty(model, self.dataset, rest)
        picked = [i for i, _ in ranking[: self.args.k]]
        return picked, time.monotonic() - start, [u for _, u in ranking]

    def run(self, start_model: Path) -> None:
        args = self.args
        seed_ids = sorted(
            int(i)
            for i in np.random.default_rng(args.seed).choice(self.pool, args.seed_images, replace=False)
        )
        self.evaluate("start", 0, start_model, [], {"picked": []})
        model0, seconds = self.tune(start_model, "round0", seed_ids)
        self.evaluate("seed", 0, model0, seed_ids, {"picked": seed_ids, "finetune_seconds": seconds})
        for strategy in STRATEGIES:
            rng = np.random.default_rng(args.seed + 1)
            model, labelled = model0, list(seed_ids)
            for round_ in range(1, args.rounds + 1):
                picked, pick_seconds, scores = self.pick(strategy, model, labelled, rng)
                labelled += picked
                model, seconds = self.tune(model, f"{strategy}{round_}", labelled)
                extra = {"picked": picked, "pick_seconds": pick_seconds, "finetune_seconds": seconds}
                if scores is not None:
                    extra["uncertainty_picked"] = scores[: args.k]
                    extra["uncertainty_pool_median"] = float(np.median(scores))
                self.evaluate(strategy, round_, model, labelled, extra)


def table(rows: list[dict], baseline: dict) -> str:
    """The curves as aligned text, round 0 first, then each strategy's rounds."""
    head = ["strategy", "round", "images", "instances", "click mIoU", "label top-1", "finetune s"]
    lines = [head]
    for r in rows:
        lines.append(
            [
                r["strategy"],
                str(r["round"]),
                str(r["images"]),
                str(r["instances"]),
                f"{r['click_miou']:.3f}",
                f"{r['label_top1']:.3f}",
                f"{r['finetune_seconds']:.0f}" if "finetune_seconds" in r else "-",
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
    return "\n".join(text)


def plot(rows: list[dict], baseline: dict, path: Path) -> None:
    """Label top-1 and click mIoU against the number of labelled images, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = [r for r in rows if r["strategy"] == "seed"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in (
        (axes[0], "label_top1", "label top-1 (held-out)"),
        (axes[1], "click_miou", "one-click mIoU (held-out)"),
    ):
        for strategy, style in zip(STRATEGIES, ("o-", "s--"), strict=True):
            curve = seed + [r for r in rows if r["strategy"] == strategy]
            ax.plot([r["images"] for r in curve], [r[key] for r in curve], style, label=strategy)
        start = next(r for r in rows if r["strategy"] == "start")
        ax.axhline(start[key], color="grey", linestyle=":", label="starting model")
        if key == "label_top1":
            ax.axhline(
                baseline["label_top1"], color="red", linestyle=":", label=f"always {baseline['class']}"
            )
        ax.set_xlabel("labelled images")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds after the seed set (default 3)")
    p.add_argument("--k", type=int, default=5, help="images labelled per round (default 5)")
    p.add_argument("--seed-images", type=int, default=10, help="random images labelled first (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the seed set and of the random strategy")
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
    for stage in ("deepmask", "sharpmask", "multipathnet"):
        default = getattr(defaults, f"{stage}_steps")
        p.add_argument(
            f"--{stage}-steps", type=int, default=default, help=f"finetune steps (default {default})"
        )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    ensure_allocator_env(not args.no_allocator_env)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    started = time.monotonic()
    classes = [c.strip() for c in args.classes.split(",")]
    cfg = FinetuneConfig(
        deepmask_steps=args.deepmask_steps,
        sharpmask_steps=args.sharpmask_steps,
        multipathnet_steps=args.multipathnet_steps,
        device="cpu",
    )
    with tempfile.TemporaryDirectory(prefix="segmask-al-") as tmp:
        work = args.work or Path(tmp)
        project = write_subset(args.data, classes, work / "project")
        sim = Simulation(project, work, cfg, args)
        baseline = majority_baseline(sim.heldout)
        pretrain_started = time.monotonic()
        start = starting_checkpoint(args.checkpoint, args.data, classes, sim.pool, args.pretrain_steps, work)
        pretrain_seconds = time.monotonic() - pretrain_started
        sim.run(start)
    seconds = time.monotonic() - started
    print(table(sim.rows, baseline))
    print(f"total {seconds:.0f} s")
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "classes": list(classes),
        "finetune_config": asdict(cfg),
        "pool_images": len(sim.pool),
        "heldout_images": len(sim.heldout),
        "majority_baseline": baseline,
        "rows": sim.rows,
        "pretrain_seconds": pretrain_seconds,
        "seconds": seconds,
        "machine": {**machine, "loadavg_end": os.getloadavg()},
        "git": git_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(sim.rows, baseline, args.plot)
    log.info("wrote %s and %s", args.out, args.plot)


if __name__ == "__main__":
    main()
