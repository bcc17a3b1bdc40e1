"""How informative labelling an image would be, for active learning: an uncertainty in [0, 1] per image.

The measure is the expected label error on the objects the project labels, on the predictor's current image,
from ``detect()``'s pass (``MaskPredictor.detection_candidates``: proposals, MultiPathNet, detection scores)
and mask NMS:

1. candidates: the top ``proposals`` refined DeepMask windows with a non-empty mask, de-duplicated by greedy
   mask NMS (IoU > ``nms_iou``) on the detection score (``predictor.detection_scores``), exactly the
   objects ``detect()`` would consider;
2. per candidate, over the project's classes ``P`` only (``classes``; every model class when None) with
   MultiPathNet's probabilities ``p_c``, DeepMask's ``objectness`` and ``o``, the frozen ImageNet
   classifier's probability mass (over the candidate's mask, as the label head pools it) on the ImageNet
   classes of known labels outside ``P`` (``imagenet_labels.other_label_classes``: elephants, broccoli and
   knives for a project of cups and chairs):
   ``u = objectness * (1 - o) * (sum_P p_c - max_P p_c)``, the probability that the window holds an
   object, that it is not something the project does not label, *and* that its most probable project
   label is wrong (``sum_P p_c - max_P p_c = p_project * (1 - max q)``, ``q`` the label distribution given a
   project object). Background and classes outside the project count as "not a project object": a window
   the model takes for something the project does not label scores near 0 however torn it is between that
   and a project label; a window on nothing (low objectness, e.g. a blank image) scores near 0 however
   MultiPathNet spreads its guesses. A one-label project has no label to confuse, so there
   ``u = objectness * (1 - o) * min(p, 1 - p)``: the expected error of "is it the project's object";
3. the image: the mean of the ``top`` largest ``u`` (missing candidates count 0), so an image with several
   doubtful project objects outranks one with a single doubtful window.

Why (bench/README.md, bench_active_learning.py): the measure before ``o``, and ``objectness * (1 - margin)``
over all K+1 outcomes with background before it, ranked first the images full of objects outside the label
set: a model fine-tuned on a project's labels alone knows no other class (its classes are the project's), so
to it an elephant is a doubtful cup or chair, although labelling it adds no instance to learn from. The
ImageNet classifier that the label head reads is frozen and still tells elephants from cups; ``o`` keeps
that knowledge in the measure. The label the project learns is what label top-1 measures, so the measure
asks only where that label is in doubt.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from segmodels.imagenet_labels import other_label_classes
from segmodels.predictor import (
    PREANNOTATION_MAX,
    PREANNOTATION_THRESHOLD,
    Detection,
    DetectionCandidates,
    MaskPredictor,
    mask_nms,
)

TOP_OBJECTS = 3
# What rescoring reports per image: the candidates behind the score.
REPORTED_OBJECTS = 3


def project_columns(model_classes: Sequence[str], classes: Collection[str] | None) -> np.ndarray:
    """The columns of MultiPathNet's ``(R, K+1)`` probabilities (column 0 = background, column i =
    ``model_classes[i-1]``) that hold the project's ``classes`` (case-insensitive names; None: every model
    class), in model order."""
    wanted = None if classes is None else {c.lower() for c in classes}
    return np.array(
        [i for i, name in enumerate(model_classes, start=1) if wanted is None or name.lower() in wanted], int
    )


def object_uncertainty(
    objectness: np.ndarray, probs: np.ndarray, columns: np.ndarray, other: np.ndarray | None = None
) -> np.ndarray:
    """Per-candidate expected label error on the project's classes, ``(R,)`` in [0, 1].

    ``objectness (R,)``: probabilities in [0, 1]; ``probs (R, K+1)``: class probabilities (column 0 =
    background), rows summing to 1; ``columns``: the project's columns (:func:`project_columns`);
    ``other (R,)``: the probability in [0, 1] that the candidate is a known object outside the project
    (:func:`other_object_mass`; None: 0). ``objectness * (1 - other)`` times, with two or more columns,
    ``sum - max`` of them (the probability of a project object whose top project label is wrong); with
    one, ``min(p, 1 - p)``; with none, 0.
    """
    project = probs[:, columns]
    if project.shape[1] == 0:
        return np.zeros(len(probs))
    if project.shape[1] == 1:
        error = np.minimum(project[:, 0], 1.0 - project[:, 0])
    else:
        error = project.sum(axis=1) - project.max(axis=1)
    if other is not None:
        error = error * (1.0 - other)
    return np.clip(objectness * error, 0.0, 1.0)


def other_object_mass(
    predictor: MaskPredictor, masks: Sequence[np.ndarray], project: Sequence[str]
) -> np.ndarray:
    """``(R,)`` float64 in [0, 1]: per bool ``(H, W)`` image-pixel mask of the current image, the ImageNet
    classifier's probability mass on :func:`~segmodels.imagenet_labels.other_label_classes` of the
    ``project``'s label names, pooled over the mask as MultiPathNet's label head pools it. Zeros without a
    label head (nothing to ask) or masks."""
    head = predictor.model.require_multipathnet().label_head
    if head is None or not len(masks):
        return np.zeros(len(masks))
    imagenet = head.imagenet_probabilities(predictor.label_head_features(masks))
    return imagenet[:, other_label_classes(project)].sum(dim=1).double().cpu().numpy()


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
    """``predictor.detect(...)`` and :func:`image_uncertainty` of the current image from one shared pass
    (proposals and MultiPathNet run once), both for the project's ``classes`` (as in ``detect``): the
    detections, and the uncertainty dict."""
    candidates = predictor.detection_candidates(proposals)
    detections = predictor.label_candidates(candidates, score_threshold, max_detections, nms_iou, classes)
    masks = [m.mask for m in candidates.masks]
    kept = mask_nms(np.stack(masks), candidates.scores, nms_iou) if masks else []
    columns = project_columns(predictor.classes, classes)
    project = [predictor.classes[c - 1] for c in columns]
    other = other_object_mass(predictor, [masks[i] for i in kept], project)
    measure = summarise(candidates, kept, other, len(detections), predictor.classes, columns, top)
    return detections, measure


def summarise(
    candidates: DetectionCandidates,
    kept: list[int],
    other: np.ndarray,
    detections: int,
    classes: list[str],
    columns: np.ndarray,
    top: int,
) -> dict:
    """The uncertainty dict of :func:`image_uncertainty` from the pass's ``candidates`` left after mask NMS
    (indices ``kept``) with their ``other (len(kept),)`` (:func:`other_object_mass`), the model's
    ``classes``, the project's ``columns`` (:func:`project_columns`) and the number of ``detections``
    shown."""
    probs, objectness, masks = candidates.probs, candidates.objectness, candidates.masks
    uncertainties = object_uncertainty(objectness[kept], probs[kept], columns, other) if kept else np.zeros(0)
    uncertainty = image_score(uncertainties, top)
    order = np.argsort(-uncertainties)[:REPORTED_OBJECTS]
    objects = []
    for n in order:
        i = kept[n]
        best = columns[np.argsort(-probs[i, columns])[:2]]
        objects.append(
            {
                "uncertainty": float(uncertainties[n]),
                "objectness": float(objectness[i]),
                "other_object": float(other[n]),
                "labels": [classes[c - 1] for c in best],
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
    classes: Collection[str] | None = None,
) -> dict:
    """How informative labelling the predictor's current image would be for a project that labels
    ``classes`` (model class names, case-insensitive; None: every class): module docstring, in [0, 1].

    Needs ``set_image`` first and a checkpoint with MultiPathNet. Costs about one ``detect()`` on cached
    features. Returns ``{"uncertainty", "confidence" (1 - uncertainty), "detections" (how many ``detect``
    keeps at ``score_threshold``), "candidates" (de-duplicated windows scored), "objects"}``, where
    ``objects`` lists the most uncertain candidates (at most 3): their ``uncertainty``, ``objectness``,
    ``other_object`` (:func:`other_object_mass`), the two most probable project ``labels`` with their
    ``probabilities``, and ``box`` (xyxy image pixels).
    """
    _, measure = detect_with_uncertainty(
        predictor, score_threshold, proposals=proposals, nms_iou=nms_iou, top=top, classes=classes
    )
    return measure
