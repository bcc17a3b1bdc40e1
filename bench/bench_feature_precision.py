"""Features kept at float16 vs float32 (``SEGMASK_FEATURE_PRECISION``): memory, agreement and speed.

On each held-out COCO128 image (``--images``, the test split by image id), both predictors compute the
image's features; then, for each annotated object (area > 32^2 px, at most ``--objects`` per image), the
simulated annotator of ``segmask evaluate`` (segmodels/annotator.py) places up to ``--clicks`` clicks against
the float32 predictor's masks, and both predictors segment the same prompts, plus the object's tight box.
Reports:

- ``MB per image``: ``ImageFeatures.nbytes`` after opening (the trunk), after a click, and after
  pre-annotation (``detect()``, which adds the dense heads), means over the images;
- agreement of every prompt's mask (IoU between the float16 and the float32 mask: mean, minimum, share >=
  0.99) and of pre-annotation (same labels in the same order; largest score difference);
- speed: a repeated click on cached features (its memo cleared), medians in ms, side by side.

A benchmark, never a pass/fail test. Prints a table and writes JSON::

    .venv/bin/python bench/bench_feature_precision.py [--images 8] [--objects 4] [--clicks 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from backend.settings import DEFAULT_DATA_DIR
from segmodels.annotator import click_point, next_click
from segmodels.data import CocoInstances
from segmodels.eval_report import format_table
from segmodels.geometry import mask_iou
from segmodels.predictor import (
    DEFAULT_CHECKPOINT,
    FEATURE_DTYPES,
    ImageFeatures,
    MaskPredictor,
    load_predictor,
)

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


def click_ms(
    predictor: MaskPredictor, features: ImageFeatures, point: tuple[float, float], repeats: int
) -> float:
    """Median ms of one click on ``features`` (the predictor's current ones), its memoised result forgotten
    each time."""
    times = []
    for _ in range(repeats):
        features.prompt_masks.clear()
        start = time.perf_counter()
        predictor.segment([point], [1])
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def measure_image(preds: dict[str, MaskPredictor], dataset: CocoInstances, index: int, args) -> dict:
    image = dataset.image(index)
    record: dict = {"image_id": dataset.images[index]["id"], "ious": [], "mb": {}, "click_ms": {}}
    feats = {name: p.compute_features(image) for name, p in preds.items()}
    for name, p in preds.items():
        p.set_features(feats[name])
        record["mb"][name] = {"open": feats[name].nbytes / MB}
    instances = [i for i in dataset.instances_by_image[index] if i.area > 32**2][: args.objects]
    for inst in instances:
        gt = dataset.mask(inst)
        points, labels = [click_point(gt)], [1]
        for _ in range(args.clicks):
            masks = {name: p.segment(points, labels).mask for name, p in preds.items()}
            record["ious"].append(mask_iou(masks["float16"], masks["float32"]))
            click = next_click(masks["float32"], gt)
            if click is None:
                break
            points.append(click[0])
            labels.append(click[1])
        x, y, w, h = inst.box
        boxes = {name: p.segment(box=[x, y, x + w, y + h]).mask for name, p in preds.items()}
        record["ious"].append(mask_iou(boxes["float16"], boxes["float32"]))
    if instances:
        first = click_point(dataset.mask(instances[0]))
        for name, p in preds.items():
            record["click_ms"][name] = click_ms(p, feats[name], first, args.repeats)
            record["mb"][name]["click"] = feats[name].nbytes / MB
    detections = {name: p.detect(score_threshold=0.0) for name, p in preds.items()}
    for name in preds:
        record["mb"][name]["pre-annotated"] = feats[name].nbytes / MB
    record["labels_equal"] = [d.label for d in detections["float16"]] == [
        d.label for d in detections["float32"]
    ]
    pairs = zip(detections["float16"], detections["float32"], strict=False)
    record["max_score_diff"] = max((abs(a.score - b.score) for a, b in pairs), default=0.0)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "feature-precision.json")
    args = parser.parse_args()
    dataset = CocoInstances(args.data, "val")
    indices = sorted(range(len(dataset)), key=lambda i: dataset.images[i]["id"])[: args.images]
    preds = {
        name: load_predictor(args.checkpoint, feature_dtype=dtype) for name, dtype in FEATURE_DTYPES.items()
    }
    records = [measure_image(preds, dataset, i, args) for i in tqdm(indices, desc="images", unit="image")]
    ious = np.array([v for r in records for v in r["ious"]])
    rows = []
    for name in preds:
        mb = {
            stage: float(np.mean([r["mb"][name][stage] for r in records if stage in r["mb"][name]]))
            for stage in ("open", "click", "pre-annotated")
        }
        ms = float(np.median([r["click_ms"][name] for r in records if name in r["click_ms"]]))
        rows.append(
            [name, f"{mb['open']:.1f}", f"{mb['click']:.1f}", f"{mb['pre-annotated']:.1f}", f"{ms:.1f}"]
        )
    print(f"{len(records)} held-out images, {len(ious)} prompts; torch threads {torch.get_num_threads()}")
    print(
        format_table(["features", "MB open", "MB after click", "MB pre-annotated", "repeated click ms"], rows)
    )
    summary = {
        "prompts": len(ious),
        "mask_iou_mean": float(ious.mean()),
        "mask_iou_min": float(ious.min()),
        "share_iou_at_least_0.99": float((ious >= 0.99).mean()),
        "detections_same_labels": sum(r["labels_equal"] for r in records),
        "max_detection_score_diff": max(r["max_score_diff"] for r in records),
    }
    print(
        f"float16 vs float32 masks: IoU mean {summary['mask_iou_mean']:.4f}, "
        f"min {summary['mask_iou_min']:.3f}, "
        f"{summary['share_iou_at_least_0.99']:.1%} >= 0.99; pre-annotation labels equal on "
        f"{summary['detections_same_labels']}/{len(records)} images, largest score difference "
        f"{summary['max_detection_score_diff']:.4f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "bench/bench_feature_precision.py",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "checkpoint": str(args.checkpoint),
        "summary": summary,
        "rows": rows,
        "images": records,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
