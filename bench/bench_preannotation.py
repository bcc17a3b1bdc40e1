"""Which masks pre-annotation shows: how detections are ranked, and how many per image, measured by 4-fold
cross-validation over the training images and once on the held-out split.

For every image, the shipped predictor's top-100 refined proposals are labelled by a MultiPathNet that never
saw the image: on a training image (``image_id % 5 != 0``), one trained on the other three folds
(``image_id % 4``) with the shipped recipe (class list of the whole train split, label head fit by
``fit_labels``, then ``--steps`` tower steps of 4 images x 64 RoIs, weight decay 0.1); on a held-out image,
the shipped model. Caveat: DeepMask, which ranks by objectness and produced the proposals, trained on the CV
images, which flatters objectness in CV; the held-out rows have no such leak but only 21 images.

Rankings (each followed by mask NMS at IoU 0.5 on its own score):

- ``detection score``: what ``detect()`` ships (``predictor.detection_scores``: objectness odds times the
  share of the image the mask covers);
- ``objectness``: DeepMask's objectness of the window alone;
- ``sqrt(objectness * p_class)``: with MultiPathNet's probability of the chosen class, background included
  (the release before).

Per ranking: segm AP (COCOeval with categories, the whole ranked list) and, per cap on detections per image
among those scoring at least ``detect()``'s threshold, what an annotator sees
(``segmodels.eval_detection.precision_recall``: precision, the same whatever the label, that of the detections
each cap adds, recall of instances > 32^2).
Prints tables and writes ``bench/results/preannotation.json``::

    .venv/bin/python bench/bench_preannotation.py [--steps 1000]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from backend.settings import DEFAULT_DATA_DIR
from segmodels.checkpoint import load_checkpoint
from segmodels.coco_scoring import coco_ground_truth, detection_ap
from segmodels.data import CocoInstances
from segmodels.eval_detection import PRECISION_CAPS, cap_rows, count_caps
from segmodels.eval_interactive import MIN_AREA
from segmodels.eval_report import format_table
from segmodels.export import detections_to_coco
from segmodels.model import SegmentationModel
from segmodels.predictor import (
    DEFAULT_CHECKPOINT,
    PREANNOTATION_THRESHOLD,
    Detection,
    DetectionCandidates,
    MaskPredictor,
)
from segmodels.train_common import TrainConfig
from segmodels.train_multipathnet import (
    TapCache,
    class_list,
    fit_labels,
    image_rois,
    multipathnet_parameters,
    multipathnet_step,
    usable_rois,
)

REPO = Path(__file__).resolve().parents[1]
DATA = DEFAULT_DATA_DIR
OUT = REPO / "bench" / "results" / "preannotation.json"
FOLDS = 4
PROPOSALS = 100
# The shipped MultiPathNet's recipe (README, "Training"): batch 64 = 4 images per step, weight decay 0.1.
RECIPE = {"batch_size": 64, "weight_decay": 0.1, "lr": 1e-3}
# Each ranking: an image's candidates -> their scores (R,). p_class: MultiPathNet's probability of the
# chosen (most probable foreground) class.
RANKINGS: dict[str, Callable[[DetectionCandidates], np.ndarray]] = {
    "detection score (shipped)": lambda c: c.scores,
    "objectness": lambda c: c.objectness,
    "sqrt(objectness * p_class)": lambda c: np.sqrt(c.objectness * c.probs[:, 1:].max(axis=1)),
}


def fold_of(image_id: int) -> int:
    return image_id % FOLDS


def train_fold(
    fold: int, train: CocoInstances, rois: list, taps: TapCache, steps: int, device: torch.device
) -> SegmentationModel:
    """The shipped checkpoint with a new MultiPathNet trained on the train images outside ``fold``."""
    model, _ = load_checkpoint(DEFAULT_CHECKPOINT, device)
    names, ids = class_list(train)
    labels = {cid: i + 1 for i, cid in enumerate(ids)}
    model.set_classes(names, ids)
    kept = [im["id"] for im in train.images if fold_of(im["id"]) != fold]
    fit_labels(model, TapCache(model, CocoInstances(DATA, "train", image_ids=kept), device), labels)
    cfg = TrainConfig("multipathnet", str(DATA), "", epochs=1, steps_per_epoch=steps, seed=fold, **RECIPE)
    usable = [r for r in usable_rois(rois) if fold_of(train.images[r.image_index]["id"]) != fold]
    params = multipathnet_parameters(model)
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr_scale": 1.0}], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    rng = np.random.default_rng(fold)
    model.train()
    for step in tqdm(range(steps), desc=f"fold {fold}", unit="step", dynamic_ncols=True):
        multipathnet_step(model, optimizer, taps, usable, rng, cfg, step)
    return model.eval()


def image_detections(
    predictor: MaskPredictor, image: np.ndarray, threshold: float
) -> dict[str, tuple[list[Detection], list[Detection]]]:
    """Per ranking, the detections of ``image``'s top-:data:`PROPOSALS` non-empty proposals (``detect()``'s
    pass) best first: all of them (for AP), and those scoring at least ``threshold`` (what pre-annotation
    chooses from; the caps cut this list)."""
    predictor.set_image(image)
    candidates = predictor.detection_candidates(PROPOSALS)
    out = {}
    for name, rank in RANKINGS.items():
        every = predictor.label_candidates(replace(candidates, scores=rank(candidates)), 0.0, len(candidates))
        out[name] = (every, [d for d in every if d.score >= threshold])
    return out


def summarise(dataset: CocoInstances, detections: dict[int, dict]) -> dict:
    """Per ranking: segm/bbox AP and the precision/recall rows per cap."""
    indices = sorted(detections)
    instances = sum(
        inst.area > MIN_AREA and inst.has_mask for i in indices for inst in dataset.instances_by_image[i]
    )
    gt = coco_ground_truth(dataset, indices)
    out = {}
    for name in RANKINGS:
        results = []
        counts = {c: np.zeros(4, int) for c in PRECISION_CAPS}
        for i in indices:
            every, shown = detections[i][name]
            results += detections_to_coco(every, dataset.images[i]["id"])
            count_caps(counts, shown, dataset.instances_by_image[i], dataset)
        ap = detection_ap(gt, results)
        caps = cap_rows(counts, len(indices), instances)
        out[name] = {"segm": ap["segm"], "bbox": ap["bbox"], "caps": caps}
    return {"images": len(indices), "instances_over_32": instances, "rankings": out}


def table(title: str, summary: dict) -> str:
    headers = ["ranking", "segm AP", "at most", "per image", "precision", "any label", "added, any", "recall"]
    rows = []
    for name, r in summary["rankings"].items():
        for row in r["caps"]:
            cells = [row[k] for k in ("precision", "mask_precision", "last_mask_precision", "recall")]
            rows.append(
                [
                    name,
                    f"{r['segm']['AP']:.3f}",
                    str(row["max_detections"]),
                    f"{row['per_image']:.2f}",
                    *("-" if v is None else f"{v:.3f}" for v in cells),
                ]
            )
    head = f"{title}: {summary['images']} images, {summary['instances_over_32']} instances > 32^2"
    return head + "\n" + format_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000, help="tower steps per fold (shipped: 1000)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    device = torch.device("cpu")
    started = time.monotonic()
    train, val = CocoInstances(DATA, "train"), CocoInstances(DATA, "val")
    threshold = PREANNOTATION_THRESHOLD
    shipped = MaskPredictor(*load_checkpoint(DEFAULT_CHECKPOINT, device), device)
    _, ids = class_list(train)
    rois = image_rois(shipped, train, {cid: i + 1 for i, cid in enumerate(ids)})
    taps = TapCache(shipped.model, train, device)
    cv: dict[int, dict] = {}
    for fold in range(FOLDS):
        model = train_fold(fold, train, rois, taps, args.steps, device)
        predictor = MaskPredictor(model, {"stages": ["sharpmask", "multipathnet"]}, device)
        held = [i for i, im in enumerate(train.images) if fold_of(im["id"]) == fold]
        for i in tqdm(held, desc=f"fold {fold} images", unit="image", dynamic_ncols=True):
            cv[i] = image_detections(predictor, train.image(i), threshold)
    heldout = {
        i: image_detections(shipped, val.image(i), threshold)
        for i in tqdm(range(len(val)), desc="held-out images", unit="image", dynamic_ncols=True)
    }
    record = {
        "benchmark": "preannotation",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "checkpoint": str(DEFAULT_CHECKPOINT),
        "steps_per_fold": args.steps,
        "cv": summarise(train, cv),
        "heldout": summarise(val, heldout),
        "seconds": time.monotonic() - started,
    }
    print(table(f"4-fold CV over the train split (MultiPathNet per fold, {args.steps} steps)", record["cv"]))
    print()
    print(table("Held-out split (shipped model)", record["heldout"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"\n{record['seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
