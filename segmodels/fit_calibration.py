"""``segmask calibrate``: fit a checkpoint's detection calibration (calibration.py) on the training images.

One detection pass per image (``MaskPredictor.detection_candidates``) gives every candidate's features and,
against the image's instances, whether it is right (mask IoU >= 0.5 with an instance of its label, one
instance per detection, best first, as ``eval_detection.match_detections`` counts). Two things keep the fit
honest about images the model never saw:

- MultiPathNet's label head learnt the training images, so each image's class probabilities come from a
  label head refit without that image's fold (:func:`out_of_fold_probs`, the shipped recipe
  ``multipathnet.fit_label_head``). DeepMask's objectness and masks saw every training image too; that
  leak stays (no cheap remedy) and flatters the cross-validated numbers.
- A score must describe what ``detect`` shows: each fit runs twice, on every candidate, then on the
  detections that first model's ranking keeps (``predictor.select_masks``: mask NMS and fragments), labelled
  one-to-one (:func:`fit_shown`).

The models of :data:`MODELS` are compared by cross-validation over image folds (:func:`cross_validate`) and
the one with the lowest log-loss (over the detections each keeps) is refit on every training image
(:func:`calibrate`).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segmodels.calibration import (
    METADATA_KEY,
    Calibration,
    candidate_features,
    fit_isotonic,
    fit_logistic,
    log_loss,
    reliability,
)
from segmodels.checkpoint_files import METADATA_FILE, WEIGHTS_FILE, atomic_write_json, read_metadata
from segmodels.data import CocoInstances
from segmodels.eval_detection import greedy_matches
from segmodels.eval_interactive import MIN_AREA
from segmodels.geometry import masks_iou_matrix
from segmodels.multipathnet import fit_label_head
from segmodels.predictor import (
    FRAGMENT_SHARE,
    PREANNOTATION_THRESHOLD,
    MaskPredictor,
    mask_overlaps,
    select_masks,
)

FOLDS = 4
NMS_IOU = 0.5
# The compared models: name -> (kind, features). "detection score" is what detect() ranked by before.
MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "platt: detection score": ("logistic", ("detection_logit",)),
    "isotonic: detection score": ("isotonic", ("detection_logit",)),
    "logistic: objectness, area": ("logistic", ("objectness", "log_area")),
    "isotonic: class probability": ("isotonic", ("class_logit",)),
    "logistic: objectness, area, class, margin": (
        "logistic",
        ("objectness", "log_area", "class_logit", "margin"),
    ),
}


@dataclass
class ImageRows:
    """One training image's detection pass: ``R`` candidates, ``G`` instances with a mask.

    ``objectness``, ``area`` ``(R,)``: window objectness probability, mask share of the image; ``probs (R,
    K+1)``: the checkpoint's class probabilities; ``pooled (R, D)``, ``prior (R, K)``: the label head's
    inputs (``MaskPredictor.label_head_inputs``); ``gt_pooled (N, D)``, ``gt_labels (N,)``: the same for the
    image's instances of a known class (labels 0..K-1); ``iou (R, G)`` mask IoU with the instances,
    ``gt_class (G,)`` their category ids, ``gt_large (G,)`` area > 32^2; ``overlaps (R, R)``
    (``predictor.mask_overlaps``)."""

    image_id: int
    objectness: np.ndarray
    area: np.ndarray
    probs: np.ndarray
    pooled: torch.Tensor
    prior: torch.Tensor
    gt_pooled: torch.Tensor
    gt_labels: torch.Tensor
    iou: np.ndarray
    gt_class: np.ndarray
    gt_large: np.ndarray
    overlaps: np.ndarray


def collect(
    predictor: MaskPredictor, dataset: CocoInstances, indices: Sequence[int], proposals: int = 100
) -> list[ImageRows]:
    """The detection pass on each image of ``dataset`` at ``indices`` (a progress bar over images)."""
    label_of = {c: k for k, c in enumerate(predictor.model.config.class_ids)}
    has_head = predictor.model.require_multipathnet().label_head is not None
    rows = []
    for index in tqdm(indices, desc="calibrate", unit="image", dynamic_ncols=True):
        predictor.set_image(dataset.image(index))
        cands = predictor.detection_candidates(proposals)
        if not len(cands):
            continue
        masks = np.stack([m.mask for m in cands.masks])
        instances = [inst for inst in dataset.instances_by_image[index] if inst.has_mask]
        gt = [dataset.mask(inst) for inst in instances]
        known = [
            (m, label_of[inst.category_id])
            for m, inst in zip(gt, instances, strict=True)
            if inst.category_id in label_of
        ]
        # Without a label head there is nothing to refit: the inputs stay empty (out_of_fold_probs).
        pooled, prior = predictor.label_head_inputs(list(masks)) if has_head else (torch.zeros(0), None)
        gt_pooled = predictor.label_head_features([m for m, _ in known]) if has_head and known else pooled[:0]
        rows.append(
            ImageRows(
                image_id=int(dataset.images[index]["id"]),
                objectness=cands.objectness,
                area=masks.mean(axis=(1, 2)),
                probs=cands.probs.astype(np.float64),
                pooled=pooled.cpu(),
                prior=torch.zeros(0) if prior is None else prior.cpu(),
                gt_pooled=gt_pooled.cpu(),
                gt_labels=torch.tensor([k for _, k in known], dtype=torch.long),
                iou=masks_iou_matrix(masks, np.stack(gt)) if gt else np.zeros((len(masks), 0), np.float32),
                gt_class=np.array([inst.category_id for inst in instances], int),
                gt_large=np.array([inst.area > MIN_AREA for inst in instances], bool),
                overlaps=mask_overlaps(masks),
            )
        )
    return rows


def folds_of(rows: Sequence[ImageRows], folds: int = FOLDS) -> np.ndarray:
    """``(N,)`` fold of each image: its rank by image id modulo ``folds``."""
    rank = np.argsort(np.argsort([r.image_id for r in rows], kind="stable"), kind="stable")
    return rank % folds


def out_of_fold_probs(
    predictor: MaskPredictor, rows: Sequence[ImageRows], fold: np.ndarray
) -> list[np.ndarray]:
    """Each image's class probabilities ``(R, K+1)`` with the label head refit (from zeros, the shipped
    recipe) on the instances of the other folds: the towers' background column, then ``(1 - p_bg)`` times
    that head's softmax, as ``MultiPathNet.forward`` combines them."""
    shipped = predictor.model.require_multipathnet().label_head
    if shipped is None:
        return [r.probs for r in rows]
    out = [r.probs for r in rows]
    for f in np.unique(fold):
        head = copy.deepcopy(shipped).cpu().float()
        with torch.no_grad():
            head.linear.weight.zero_()
            head.linear.bias.zero_()
            head.prior_weight.fill_(1.0)
        train = [r for r, g in zip(rows, fold, strict=True) if g != f]
        fit_label_head(head, torch.cat([r.gt_pooled for r in train]), torch.cat([r.gt_labels for r in train]))
        with torch.no_grad():
            for i in np.flatnonzero(fold == f):
                r = rows[i]
                share = head.logits(r.pooled, r.prior).softmax(dim=1).double().numpy()
                background = r.probs[:, :1]
                out[i] = np.hstack([background, (1.0 - background) * share])
    return out


def features_of(row: ImageRows, probs: np.ndarray) -> np.ndarray:
    """The calibration features ``(R, F)`` of an image's candidates with class probabilities ``probs``."""
    return candidate_features(row.objectness, row.area, probs)


def chosen_class(probs: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """``(R,)`` category id of each candidate's most probable foreground class."""
    return np.asarray(class_ids)[probs[:, 1:].argmax(axis=1)]


def shown(row: ImageRows, scores: np.ndarray, classes: np.ndarray) -> tuple[list[int], list[int | None]]:
    """What ``detect`` keeps of an image ranked by ``scores`` (mask NMS, fragments): the candidates kept, best
    first, and the instance each one is matched to (one each, best first; None: wrong). Greedy matching
    is sequential, so a prefix of the list gets the same matches as it would alone."""
    kept = select_masks(row.overlaps, scores, NMS_IOU, FRAGMENT_SHARE)
    same = classes[kept][:, None] == row.gt_class[None, :]
    return kept, greedy_matches(row.iou[kept], same)


def any_right(row: ImageRows, classes: np.ndarray) -> np.ndarray:
    """``(R,)`` float: 1 where a candidate's mask has IoU >= 0.5 with an instance of its class."""
    if not row.iou.shape[1]:
        return np.zeros(len(classes))
    return ((row.iou >= 0.5) & (classes[:, None] == row.gt_class[None, :])).any(axis=1).astype(float)


def fit_model(kind: str, features: Sequence[str], x: np.ndarray, y: np.ndarray) -> Calibration:
    return fit_isotonic(x, y, features[0]) if kind == "isotonic" else fit_logistic(x, y, features)


def fit_shown(
    kind: str,
    features: Sequence[str],
    rows: Sequence[ImageRows],
    xs: Sequence[np.ndarray],
    classes: Sequence[np.ndarray],
) -> Calibration:
    """Fit on every candidate of ``rows`` (features ``xs``, chosen classes ``classes``), then refit on the
    detections that model keeps, labelled one-to-one."""
    y = np.concatenate([any_right(r, c) for r, c in zip(rows, classes, strict=True)])
    first = fit_model(kind, features, np.vstack(xs), y)
    kept_x, kept_y = [], []
    for r, x, c in zip(rows, xs, classes, strict=True):
        kept, matched = shown(r, first.probability(x), c)
        kept_x.append(x[kept])
        kept_y.append(np.array([m is not None for m in matched], float))
    return fit_model(kind, features, np.vstack(kept_x), np.concatenate(kept_y))


def cross_validate(
    rows: Sequence[ImageRows],
    xs: Sequence[np.ndarray],
    classes: Sequence[np.ndarray],
    fold: np.ndarray,
    threshold: float = PREANNOTATION_THRESHOLD,
) -> dict[str, dict]:
    """Per model of :data:`MODELS`, fit on the other folds and scored on each fold's detections as ``detect``
    shows them: log-loss, ECE, precision and recall (instances > 32^2) at ``threshold``, detections per
    image at it, wrong ones at >= 0.9."""
    large = int(sum(r.gt_large.sum() for r in rows))
    out = {}
    for name, (kind, features) in MODELS.items():
        p_all, y_all, found = [], [], 0
        for f in np.unique(fold):
            train = [i for i in range(len(rows)) if fold[i] != f]
            model = fit_shown(
                kind, features, [rows[i] for i in train], [xs[i] for i in train], [classes[i] for i in train]
            )
            for i in np.flatnonzero(fold == f):
                p = model.probability(xs[i])
                kept, matched = shown(rows[i], p, classes[i])
                p_all.append(p[kept])
                y_all.append(np.array([m is not None for m in matched], float))
                found += sum(
                    bool(rows[i].gt_large[m])
                    for k, m in zip(kept, matched, strict=True)
                    if m is not None and p[k] >= threshold
                )
        p, y = np.concatenate(p_all), np.concatenate(y_all)
        at = p >= threshold
        out[name] = {
            "log_loss": log_loss(p, y),
            "ece": reliability(p, y)["ece"],
            "precision": float(y[at].mean()) if at.any() else None,
            "recall": found / large if large else None,
            "per_image": float(at.sum() / len(rows)),
            "wrong_at_0.9": int(((p >= 0.9) & (y == 0)).sum()),
        }
    return out


def calibrate(
    predictor: MaskPredictor, dataset: CocoInstances, indices: Sequence[int], proposals: int = 100
) -> Calibration:
    """Compare :data:`MODELS` by cross-validation over the images at ``indices`` (training images only) and
    refit the one of lowest log-loss on all of them; its ``fit`` records the comparison."""
    rows = collect(predictor, dataset, indices, proposals)
    fold = folds_of(rows)
    probs = out_of_fold_probs(predictor, rows, fold)
    class_ids = predictor.model.config.class_ids
    xs = [features_of(r, p) for r, p in zip(rows, probs, strict=True)]
    classes = [chosen_class(p, class_ids) for p in probs]
    comparison = cross_validate(rows, xs, classes, fold)
    best = min(comparison, key=lambda name: comparison[name]["log_loss"])
    kind, features = MODELS[best]
    model = fit_shown(kind, features, rows, xs, classes)
    model.fit = {
        "model": best,
        "images": [r.image_id for r in rows],
        "folds": FOLDS,
        "proposals": proposals,
        "cross_validation": comparison,
    }
    return model


def write_calibration(checkpoint: str | Path, out: str | Path, calibration: Calibration) -> Path:
    """Store ``calibration`` in the metadata (``model.json``) of checkpoint ``checkpoint`` written to ``out``
    (the same directory updates it in place; another gets a copy of the weights, unchanged)."""
    source, target = Path(checkpoint), Path(out)
    meta = read_metadata(source)
    meta[METADATA_KEY] = calibration.to_json()
    target.mkdir(parents=True, exist_ok=True)
    if source.resolve() != target.resolve():
        shutil.copyfile(source / WEIGHTS_FILE, target / WEIGHTS_FILE)
    atomic_write_json(target / METADATA_FILE, meta)
    return target
