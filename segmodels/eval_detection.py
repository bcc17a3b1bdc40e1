"""Detection quality (checkpoints with a MultiPathNet): COCO AP (coco_scoring.py, with categories) of
``MaskPredictor.detect`` at score threshold 0, at most 100 per image; what pre-annotation shows at detect()'s
default threshold (and per cap on detections per image): precision (mask IoU >= 0.5 with an unmatched
instance of the detection's label), the same whatever the label, recall over the evaluated instances (area >
32^2, eval_interactive.py) and instances found per image; how well the scores are calibrated (reliability
diagram, expected calibration error, wrong detections scoring >= 0.9); and the same before calibrated scores
(``predictor.detection_scores``, one per image).

Masks are ``bool (H, W)``; detections are :class:`segmodels.predictor.Detection`, best first.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from tqdm import tqdm

from segmodels.calibration import reliability
from segmodels.coco_scoring import coco_ground_truth, detection_ap
from segmodels.data import CocoInstances, Instance
from segmodels.eval_interactive import MIN_AREA
from segmodels.export import detections_to_coco
from segmodels.geometry import masks_iou_matrix
from segmodels.predictor import (
    PREANNOTATION_MAX,
    PREANNOTATION_THRESHOLD,
    Detection,
    MaskPredictor,
    detection_scores,
)

# Detection: AP over every detection (threshold 0), COCO's default maxDets (1, 10, 100).
DETECTION_THRESHOLD = 0.0
DETECTION_MAX = 100
# Detections per image at which pre-annotation precision and recall are reported (with detect()'s default),
# to choose SEGMASK_MAX_DETECTIONS from.
PRECISION_CAPS = (1, 2, 3, 5, 10)
DETECTION_IMAGES = 4
# Pre-annotation before calibrated scores, for comparison: detection_scores, at most one per image.
BEFORE_MAX = 1
# Detections scoring at least this should all be right: the wrong ones are counted.
CONFIDENT = 0.9


def greedy_matches(iou: np.ndarray, allowed: np.ndarray) -> list[int | None]:
    """One-to-one matching of detections (rows of ``iou (N, G)``, best first) to instances (columns): each
    takes the untaken instance of highest IoU among those with IoU >= 0.5 and ``allowed (N, G)`` bool; the
    instance index per detection, None where none is left."""
    taken: set[int] = set()
    out: list[int | None] = []
    for row, ok in zip(iou, allowed, strict=True):
        order = [int(j) for j in np.argsort(-row) if row[j] >= 0.5 and ok[j] and j not in taken]
        out.append(order[0] if order else None)
        taken.update(order[:1])
    return out


def match_detections(
    detections: Sequence[Detection], instances: Sequence[Instance], dataset: CocoInstances
) -> tuple[int, int, int]:
    """Greedy one-to-one matching (:func:`greedy_matches`), best detection first, of ``detections`` to the
    image's ``instances`` with a mask at mask IoU >= 0.5: ``(right label, any label, matched instances area >
    32^2)``. The first two count detections, the last the larger instances found with the right label."""
    masked = [inst for inst in instances if inst.has_mask]
    if not detections or not masked:
        return 0, 0, 0
    iou, same = _overlaps(detections, masked, dataset)
    right = [j for j in greedy_matches(iou, same) if j is not None]
    any_label = [j for j in greedy_matches(iou, np.ones_like(same)) if j is not None]
    return len(right), len(any_label), sum(masked[j].area > MIN_AREA for j in right)


PR_COLUMNS = ("precision", "mask_precision", "last_mask_precision", "recall")


def precision_recall(
    counts: np.ndarray, images: int, instances: int, fewer: np.ndarray | None = None
) -> dict[str, float | None]:
    """What an annotator sees with pre-annotation at one setting, from ``counts`` (detections shown, right,
    right whatever the label, instances found; :func:`match_detections`): detections per image, precision
    (mask IoU >= 0.5 with an unmatched instance of their label), the same whatever the label, and recall
    (over ``instances``, those with area > 32^2). ``fewer``: the counts of the next smaller setting, for the
    precision whatever the label of the detections this one adds (``last_mask_precision``)."""
    shown, right, any_label, found = (int(c) for c in counts)
    added = shown - int(fewer[0]) if fewer is not None else shown
    gained = any_label - int(fewer[2]) if fewer is not None else any_label
    return {
        "per_image": shown / images if images else 0.0,
        "precision": right / shown if shown else None,
        "mask_precision": any_label / shown if shown else None,
        "last_mask_precision": gained / added if added else None,
        "recall": found / instances if instances else None,
    }


def count_caps(
    counts: dict[int, np.ndarray], shown: Sequence[Detection], instances: Sequence[Instance], dataset
) -> None:
    """Add one image to ``counts`` (per cap: detections shown, right, right whatever the label, instances
    found; :func:`match_detections`) for its detections ``shown``, best first, cut at each cap."""
    for cap, total in counts.items():
        total += [len(shown[:cap]), *match_detections(shown[:cap], instances, dataset)]


def cap_rows(counts: dict[int, np.ndarray], images: int, instances: int) -> list[dict]:
    """:func:`precision_recall` per cap of ``counts`` (:func:`count_caps`), smallest first, each with the
    precision of what it adds over the previous cap."""
    caps = sorted(counts)
    return [
        {"max_detections": c, **precision_recall(counts[c], images, instances, counts[p] if p else None)}
        for p, c in zip([None, *caps[:-1]], caps, strict=True)
    ]


def right_per_detection(
    detections: Sequence[Detection], instances: Sequence[Instance], dataset: CocoInstances
) -> list[bool]:
    """Whether each of ``detections`` (best first) is right: matched one-to-one (:func:`greedy_matches`) to an
    instance of its label at mask IoU >= 0.5, as :func:`match_detections` counts them."""
    masked = [inst for inst in instances if inst.has_mask]
    if not detections or not masked:
        return [False] * len(detections)
    return [j is not None for j in greedy_matches(*_overlaps(detections, masked, dataset))]


def _overlaps(
    detections: Sequence[Detection], masked: Sequence[Instance], dataset: CocoInstances
) -> tuple[np.ndarray, np.ndarray]:
    """Mask IoU ``(N, G)`` of ``detections`` with the instances ``masked`` (all with a mask), and ``(N, G)``
    bool: the detection's class is the instance's."""
    gt = np.stack([dataset.mask(inst) for inst in masked])
    iou = masks_iou_matrix(np.stack([d.mask for d in detections]), gt)
    same = np.array([[inst.category_id == d.class_id for inst in masked] for d in detections])
    return iou, same


def instances_covered(
    detections: Sequence[Detection], instances: Sequence[Instance], dataset: CocoInstances
) -> list[int]:
    """How many of the image's ``instances`` (with a mask) each detection's mask covers more than half of:
    2 or more is a mask (and likely a polygon) spanning several instances."""
    masked = [inst for inst in instances if inst.has_mask]
    if not detections or not masked:
        return [0] * len(detections)
    gt = np.stack([dataset.mask(inst) for inst in masked]).reshape(len(masked), -1).astype(np.float32)
    det = np.stack([d.mask for d in detections]).reshape(len(detections), -1).astype(np.float32)
    share = (det @ gt.T) / np.maximum(gt.sum(axis=1), 1.0)
    return [int(n) for n in (share > 0.5).sum(axis=1)]


def evaluate_detection(
    predictor: MaskPredictor, dataset: CocoInstances, image_indices: Sequence[int], proposals: int = 100
) -> tuple[dict, dict[int, tuple[list[Detection], float | None]]]:
    """One detection pass per image (``detection_candidates``), labelled twice: ranked by its scores (the
    calibrated probability when the checkpoint has a calibration) and, for comparison, by the uncalibrated
    ``predictor.detection_scores`` as pre-annotation showed them before (``before``: at most
    :data:`BEFORE_MAX` per image).

    For each: COCO AP of ``label_candidates(score_threshold=0, max_detections=100)`` and pre-annotation at
    ``detect``'s default threshold: detections per image, precision and recall (:func:`match_detections`;
    recall over instances with area > 32^2) and the instances found per image; for the scores, also each cap
    of :data:`PRECISION_CAPS`, the reliability diagram's data and expected calibration error of every
    threshold-0 detection (right: :func:`right_per_detection`), the wrong ones scoring at least
    :data:`CONFIDENT` and the detections shown that span several instances (:func:`instances_covered`).
    The defaults' detections are returned with the image's top score (None without detections) for the first
    :data:`DETECTION_IMAGES` images with instances, keyed by image index.
    """
    threshold, limit = PREANNOTATION_THRESHOLD, PREANNOTATION_MAX or DETECTION_MAX
    results: list[dict] = []
    before_results: list[dict] = []
    seconds: list[float] = []
    examples: dict[int, tuple[list[Detection], float | None]] = {}
    counts = {c: np.zeros(4, int) for c in {*PRECISION_CAPS, limit}}
    before = np.zeros(4, int)
    scores: list[float] = []
    right: list[bool] = []
    evaluated = spanning = 0
    for index in tqdm(image_indices, desc="detection", unit="image", dynamic_ncols=True):
        start = time.perf_counter()
        predictor.set_image(dataset.image(index))
        candidates = predictor.detection_candidates(proposals)
        detections = predictor.label_candidates(candidates, DETECTION_THRESHOLD, DETECTION_MAX)
        seconds.append(time.perf_counter() - start)
        uncalibrated = replace(candidates, scores=detection_scores(candidates.masks))
        earlier = predictor.label_candidates(uncalibrated, DETECTION_THRESHOLD, DETECTION_MAX)
        image_id = dataset.images[index]["id"]
        results += detections_to_coco(detections, image_id)
        before_results += detections_to_coco(earlier, image_id)
        instances = dataset.instances_by_image[index]
        shown = [d for d in detections if d.score >= threshold]
        count_caps(counts, shown, instances, dataset)
        spanning += sum(n >= 2 for n in instances_covered(shown[:limit], instances, dataset))
        earlier_shown = [d for d in earlier if d.score >= threshold][:BEFORE_MAX]
        before += [len(earlier_shown), *match_detections(earlier_shown, instances, dataset)]
        scores += [d.score for d in detections]
        right += right_per_detection(detections, instances, dataset)
        evaluated += sum(inst.area > MIN_AREA and inst.has_mask for inst in instances)
        if len(examples) < DETECTION_IMAGES and instances:
            examples[index] = (shown[:limit], detections[0].score if detections else None)
    images = len(image_indices)
    at = {row["max_detections"]: row for row in cap_rows(counts, images, evaluated)}
    gt = coco_ground_truth(dataset, image_indices)
    p, y = np.array(scores), np.array(right, float)
    metrics = {
        "images": images,
        "proposals": proposals,
        "score_threshold": DETECTION_THRESHOLD,
        "max_detections": DETECTION_MAX,
        "detections": len(results),
        "calibrated": predictor.calibration is not None,
        "default_threshold": threshold,
        "default_max_detections": limit,
        "mean_detections_at_default": at[limit]["per_image"],
        "precision_at_default": at[limit]["precision"],
        "mask_precision_at_default": at[limit]["mask_precision"],
        "recall_at_default": at[limit]["recall"],
        "found_per_image_at_default": counts[limit][3] / images if images else 0.0,
        "instances_evaluated": evaluated,
        "reliability": reliability(p, y),
        "ece_at_default": reliability(p[p >= threshold], y[p >= threshold])["ece"],
        "confident": CONFIDENT,
        "confident_detections": int((p >= CONFIDENT).sum()),
        "confident_wrong": int(((p >= CONFIDENT) & (y == 0)).sum()),
        "spanning_at_default": spanning,
        "at_caps": list(at.values()),
        "median_seconds_per_image": statistics.median(seconds) if seconds else None,
        "before": {
            "score": "predictor.detection_scores",
            "max_detections": BEFORE_MAX,
            **precision_recall(before, images, evaluated),
            "found_per_image": before[3] / images if images else 0.0,
            **detection_ap(gt, before_results),
        },
        **detection_ap(gt, results),
    }
    return metrics, examples
