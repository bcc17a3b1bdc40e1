"""How informative labelling an image would be, for active learning: an uncertainty in [0, 1] per image.

The measure, on the predictor's current image, from one ``detect()``-like pass (proposals, MultiPathNet,
mask NMS):

1. candidates: the top ``proposals`` refined DeepMask windows with a non-empty mask, de-duplicated by greedy
   mask NMS (IoU > ``nms_iou``) on the detection score (``predictor.detection_scores``), exactly the
   objects ``detect()`` would consider;
2. per candidate, ``u = objectness * (1 - margin)``: ``objectness`` is DeepMask's probability that the window
   holds an object, ``margin`` the gap between the two most probable of MultiPathNet's K+1 outcomes
   (background included). ``u`` is high when the window probably holds an object and the classifier is torn
   between two labels, or between a label and "nothing"; it is low when either model is sure (a confident
   label, or confidently no object);
3. the image: the mean of the ``top`` largest ``u`` (missing candidates count 0), so an image with several
   doubtful objects outranks one with a single doubtful window.

An image where the model is confident about everything (every likely object confidently labelled, or no
likely object at all, e.g. a blank image) scores near 0; one where the best candidates are coin flips scores
near 1. Margin sampling ("best versus second best") is the classic uncertainty criterion for classifiers;
weighting it by objectness keeps the background windows every image has from dominating.

Known weakness (bench/README.md, bench_active_learning.py): objects of classes outside the project's label
set are where a small classifier hesitates between a project class and background, so images full of them
rank high although labelling them adds no instance to learn from.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from segmodels.predictor import (
    PREANNOTATION_MAX,
    PREANNOTATION_THRESHOLD,
    Detection,
    Mask,
    MaskPredictor,
    detection_scores,
    mask_nms,
)

TOP_OBJECTS = 3
# What rescoring reports per image: the candidates behind the score.
REPORTED_OBJECTS = 3


def object_uncertainty(objectness: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-candidate uncertainty ``objectness * (1 - margin)`` in [0, 1].

    ``objectness (R,)``: probabilities in [0, 1]; ``probs (R, K+1)``: class probabilities (column 0 =
    background), rows summing to 1. ``margin`` is the difference of each row's two largest probabilities.
    """
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    return np.clip(objectness * (1.0 - margin), 0.0, 1.0)


def image_score(uncertainties: np.ndarray, top: int = TOP_OBJECTS) -> float:
    """Mean of the ``top`` largest per-candidate uncertainties (missing candidates count 0)."""
    largest = np.sort(uncertainties)[::-1][:top]
    return float(largest.sum() / top)


def detect_with_uncertainty(
    predictor: MaskPredictor,
    score_threshold: float = PREANNOTATION_THRESHOLD,
    max_detections: int = PREANNOTATION_MAX,
    proposals: int = 100,
    nms_iou: float = 0.5,
    top: int = TOP_OBJECTS,
    classes: Collection[str] | None = None,
) -> tuple[list[Detection], dict]:
    """``predictor.detect(...)`` (``classes`` as there) and :func:`image_uncertainty` of the current image
    from one shared pass (proposals and MultiPathNet run once): the detections, and the uncertainty dict."""
    masks = [m for m in predictor.propose(proposals) if m.mask.any()]
    if not masks:
        return [], summarise([], np.zeros((0, 0)), np.zeros(0), [], 0, predictor.classes, top)
    probs, boxes = predictor.classify(np.stack([m.box for m in masks]), [m.mask for m in masks])
    scores = detection_scores(masks)
    detections = predictor.label_masks(
        masks, probs, boxes, scores, score_threshold, max_detections, nms_iou, classes
    )
    objectness = np.array([m.score for m in masks])
    kept = mask_nms(np.stack([m.mask for m in masks]), scores, nms_iou)
    measure = summarise(masks, probs, objectness, kept, len(detections), predictor.classes, top)
    return detections, measure


def summarise(
    masks: list[Mask],
    probs: np.ndarray,
    objectness: np.ndarray,
    kept: list[int],
    detections: int,
    classes: list[str],
    top: int,
) -> dict:
    """The uncertainty dict of :func:`image_uncertainty` from the pass's candidates (indices ``kept``)."""
    uncertainties = object_uncertainty(objectness[kept], probs[kept]) if kept else np.zeros(0)
    uncertainty = image_score(uncertainties, top)
    order = np.argsort(-uncertainties)[:REPORTED_OBJECTS]
    objects = []
    for n in order:
        i = kept[n]
        best = np.argsort(-probs[i])[:2]
        names = ["background" if c == 0 else classes[c - 1] for c in best]
        objects.append(
            {
                "uncertainty": float(uncertainties[n]),
                "objectness": float(objectness[i]),
                "labels": names,
                "probabilities": [float(probs[i, c]) for c in best],
                "box": [float(v) for v in masks[i].box],
            }
        )
    return {
        "uncertainty": uncertainty,
        "confidence": 1.0 - uncertainty,
        "detections": detections,
        "candidates": len(kept),
        "objects": objects,
    }


def image_uncertainty(
    predictor: MaskPredictor,
    proposals: int = 100,
    score_threshold: float = PREANNOTATION_THRESHOLD,
    nms_iou: float = 0.5,
    top: int = TOP_OBJECTS,
) -> dict:
    """How informative labelling the predictor's current image would be (module docstring), in [0, 1].

    Needs ``set_image`` first and a checkpoint with MultiPathNet. Costs about one ``detect()`` on cached
    features. Returns ``{"uncertainty", "confidence" (1 - uncertainty), "detections" (how many ``detect``
    keeps at ``score_threshold``), "candidates" (de-duplicated windows scored), "objects"}``, where
    ``objects`` lists the most uncertain candidates (at most 3): their ``uncertainty``, ``objectness``, the
    two most probable ``labels`` with their ``probabilities``, and ``box`` (xyxy image pixels).
    """
    return detect_with_uncertainty(predictor, score_threshold, proposals=proposals, nms_iou=nms_iou, top=top)[
        1
    ]
