"""Label accuracy (checkpoints with a MultiPathNet): top-1 accuracy of ``MaskPredictor.classify`` on every
non-crowd GT instance's mask and tight box (argmax over the foreground classes), over the evaluated instances
(area > 32^2, eval_interactive.py), per frequent class with its most common confusion, and once more over all
non-crowd instances whatever their size.

Masks are ``bool (H, W)``; boxes float ``[x1, y1, x2, y2]`` pixels (COCO annotations' ``bbox`` is ``[x, y, w,
h]``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from segmodels.data import CocoInstances
from segmodels.eval_interactive import MIN_AREA
from segmodels.geometry import coco_segmentation_to_mask, mask_to_box
from segmodels.predictor import MaskPredictor, box_mask

# Labels: classes with at least this many evaluated instances get a row of their own.
FREQUENT_CLASS = 3


@dataclass
class LabelResult:
    """MultiPathNet's label for one non-crowd GT instance, classified from its tight mask box.

    ``evaluated``: the instance passes the filter of the other parts (area > 32^2); the others count only in
    the all-sizes line. ``predicted_id``/``predicted``: the argmax over the foreground classes (dataset
    category id and name), ``probability`` its probability; ``gt_probability``: the probability of the true
    class, None when the checkpoint's label set does not have it (the instance can only be wrong).
    """

    image_id: int
    annotation_id: int
    category_id: int
    area: float
    evaluated: bool
    predicted_id: int
    predicted: str
    probability: float
    gt_probability: float | None

    @property
    def correct(self) -> bool:
        return self.predicted_id == self.category_id


def gt_box(annotation: dict, height: int, width: int) -> np.ndarray:
    """Tight xyxy box of an annotation's rasterised mask; its COCO ``bbox`` when the mask is empty (tiny
    polygons can cover no pixel centre)."""
    box = mask_to_box(coco_segmentation_to_mask(annotation["segmentation"], height, width))
    if box[2] > box[0] and box[3] > box[1]:
        return box
    x, y, w, h = annotation["bbox"]
    return np.array([x, y, x + max(w, 1.0), y + max(h, 1.0)], np.float32)


def gt_region(annotation: dict, box: np.ndarray, height: int, width: int) -> np.ndarray:
    """``bool (H, W)``: the annotation's mask, or its filled ``box`` (xyxy) when the mask covers no pixel."""
    mask = coco_segmentation_to_mask(annotation["segmentation"], height, width)
    return mask if mask.any() else box_mask(box, height, width, margin=0.0)


def evaluate_labels(
    predictor: MaskPredictor, dataset: CocoInstances, image_indices: Sequence[int]
) -> list[LabelResult]:
    """``classify`` the GT masks and tight boxes of every non-crowd annotation of the images (one call per
    image, after ``set_image``), in image order."""
    cfg = predictor.model.config
    column_of = {cid: n + 1 for n, cid in enumerate(cfg.class_ids)}
    evaluated = {
        inst.annotation_id for insts in dataset.instances_by_image for inst in insts if inst.area > MIN_AREA
    }
    by_image: dict[int, list[dict]] = {}
    for ann in dataset.annotations:
        if not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).append(ann)
    results: list[LabelResult] = []
    for index in tqdm(image_indices, desc="labels", unit="image", dynamic_ncols=True):
        info = dataset.images[index]
        anns = by_image.get(info["id"], [])
        if not anns:
            continue
        predictor.set_image(dataset.image(index))
        boxes = np.stack([gt_box(a, info["height"], info["width"]) for a in anns])
        masks = [gt_region(a, box, info["height"], info["width"]) for a, box in zip(anns, boxes, strict=True)]
        probs, _ = predictor.classify(boxes, masks)
        best = probs[:, 1:].argmax(axis=1)
        for ann, p, k in zip(anns, probs, best, strict=True):
            column = column_of.get(ann["category_id"])
            results.append(
                LabelResult(
                    info["id"],
                    ann["id"],
                    ann["category_id"],
                    float(ann["area"]),
                    ann["id"] in evaluated,
                    int(cfg.class_ids[k]),
                    cfg.classes[k],
                    float(p[k + 1]),
                    None if column is None else float(p[column]),
                )
            )
    return results


def label_summary(results: Sequence[LabelResult], names: dict[int, str]) -> dict:
    """Top-1 accuracy of the evaluated instances and of all of them, and a row per frequent class.

    ``names``: GT category id -> name. Returns ``{"n", "top1", "all_sizes": {"n", "top1"},
    "not_in_label_set", "per_class": [{"category_id", "name", "n", "top1", "confusion", "confusion_n"}]}``
    with the classes of at least :data:`FREQUENT_CLASS` evaluated instances, most instances first (then by
    name); ``confusion`` is the most common wrong label of the class (None when it has none). Rates are
    None without instances.
    """

    def top1(rows: Sequence[LabelResult]) -> float | None:
        return sum(r.correct for r in rows) / len(rows) if rows else None

    evaluated = [r for r in results if r.evaluated]
    per_category: dict[int, list[LabelResult]] = {}
    for r in evaluated:
        per_category.setdefault(r.category_id, []).append(r)
    per_class: list[dict[str, Any]] = []
    for category, rows in per_category.items():
        if len(rows) < FREQUENT_CLASS:
            continue
        wrong = Counter(r.predicted for r in rows if not r.correct).most_common(1)
        per_class.append(
            {
                "category_id": category,
                "name": names.get(category, str(category)),
                "n": len(rows),
                "top1": top1(rows),
                "confusion": wrong[0][0] if wrong else None,
                "confusion_n": wrong[0][1] if wrong else 0,
            }
        )
    per_class.sort(key=lambda c: (-c["n"], c["name"]))
    return {
        "n": len(evaluated),
        "top1": top1(evaluated),
        "all_sizes": {"n": len(results), "top1": top1(results)},
        "not_in_label_set": sum(r.gt_probability is None for r in evaluated),
        "per_class": per_class,
    }
