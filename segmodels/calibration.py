"""Calibrated detection probabilities: the chance that a detection is a correct object of its label (mask IoU
>= 0.5 with an instance of that class), from a few features of its candidate.

A :class:`Calibration` maps the :data:`FEATURES` of a detection pass's candidates
(:func:`candidate_features`) to probabilities: logistic regression on standardised features (Platt scaling
when it has one feature) or an isotonic (monotone, piecewise-linear) map of one feature. It is fitted on
training images only (:func:`fit_calibration`) and compared by cross-validation over images
(:func:`cross_validate`); it travels as plain numbers in the checkpoint's ``model.json``
(:data:`METADATA_KEY`, :meth:`Calibration.to_json`).

Also here: the expected calibration error and the reliability diagram's data (:func:`reliability`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# The checkpoint metadata key holding the fitted calibration (Calibration.to_json()).
METADATA_KEY = "calibration"
# Candidate features, in this order (probabilities enter as logits, clipped to +-LOGIT_CLIP). MultiPathNet's
# background probability is left out: its towers learnt the training images (top-1 0.99 there), and no
# refit without an image's fold is cheap, so a calibration fit on them would trust it far too much.
FEATURES = (
    "objectness",  # DeepMask's objectness logit of the window
    "log_area",  # natural log of the share of the image the mask covers
    "class_logit",  # logit of the chosen (most probable) class's share of the foreground probability
    "margin",  # that share minus the next class's
    "detection_logit",  # logit of predictor.detection_scores (objectness odds times the area share)
)
LOGIT_CLIP = 12.0
# Equal-width probability bins of the expected calibration error and the reliability diagram.
ECE_BINS = 10
# L2 penalty of the logistic fit, on standardised features (a weak prior: a few hundred positives).
L2 = 1.0


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1.0 - 1e-12)
    return np.clip(np.log(p / (1.0 - p)), -LOGIT_CLIP, LOGIT_CLIP)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def candidate_features(objectness: np.ndarray, area: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The :data:`FEATURES` ``(R, F) float64`` of ``R`` candidates, from their windows' objectness
    probabilities ``(R,)``, mask areas as a share of the image ``(R,)`` and MultiPathNet's class probabilities
    ``(R, K+1)`` (column 0 = background, which no feature reads)."""
    foreground = np.asarray(probs, np.float64)[:, 1:]
    # Among the foreground classes only: the label head's softmax, free of the towers' background column.
    foreground = foreground / np.clip(foreground.sum(axis=1, keepdims=True), 1e-12, None)
    top2 = -np.sort(-foreground, axis=1)[:, :2] if foreground.shape[1] > 1 else foreground
    second = top2[:, 1] if top2.shape[1] > 1 else np.zeros(len(top2))
    return np.stack(
        [
            _logit(objectness),
            np.log(np.clip(np.asarray(area, np.float64), 1e-6, 1.0)),
            _logit(top2[:, 0]),
            top2[:, 0] - second,
            _logit(objectness) + np.log(np.clip(np.asarray(area, np.float64), 1e-6, 1.0)),
        ],
        axis=1,
    ).reshape(-1, len(FEATURES))


@dataclass
class Calibration:
    """Features -> probability. ``kind`` "logistic": ``sigmoid(bias + weights . (x - shift) / scale)`` over
    ``features``; "isotonic": ``np.interp`` of the one feature through the knots ``(knots_x, knots_y)``.
    ``fit`` records how it was fitted (images, rows, the cross-validated comparison)."""

    kind: str
    features: tuple[str, ...]
    shift: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    bias: float = 0.0
    knots_x: list[float] = field(default_factory=list)
    knots_y: list[float] = field(default_factory=list)
    fit: dict = field(default_factory=dict)

    def probability(self, x: np.ndarray) -> np.ndarray:
        """``(R,)`` probabilities in [0, 1] of candidates with :data:`FEATURES` ``x (R, F)``."""
        columns = np.asarray(x, np.float64).reshape(-1, len(FEATURES))[:, _columns(self.features)]
        if self.kind == "isotonic":
            return np.interp(columns[:, 0], self.knots_x, self.knots_y)
        z = (columns - np.array(self.shift)) / np.array(self.scale)
        return _sigmoid(self.bias + z @ np.array(self.weights))

    def to_json(self) -> dict:
        """Plain numbers and names (the checkpoint's ``model.json``)."""
        common = {"kind": self.kind, "features": list(self.features), "fit": self.fit}
        if self.kind == "isotonic":
            return {**common, "knots_x": self.knots_x, "knots_y": self.knots_y}
        return {
            **common,
            "shift": self.shift,
            "scale": self.scale,
            "weights": self.weights,
            "bias": self.bias,
        }

    @classmethod
    def from_json(cls, data: dict) -> Calibration:
        """The inverse of :meth:`to_json`; unknown kinds or features are an error."""
        if data.get("kind") not in ("logistic", "isotonic"):
            raise ValueError(f"unknown calibration kind {data.get('kind')!r}")
        features = tuple(data["features"])
        _columns(features)
        numbers = ("shift", "scale", "weights", "knots_x", "knots_y")
        return cls(
            data["kind"],
            features,
            bias=float(data.get("bias", 0.0)),
            fit=dict(data.get("fit", {})),
            **{k: [float(v) for v in data.get(k, [])] for k in numbers},
        )


def _columns(features: Sequence[str]) -> list[int]:
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features:
        raise ValueError(f"unknown calibration features {unknown}; choose from {FEATURES}")
    return [FEATURES.index(f) for f in features]


def fit_logistic(x: np.ndarray, y: np.ndarray, features: Sequence[str], l2: float = L2) -> Calibration:
    """Logistic regression of labels ``y (N,)`` (1 = correct) on the ``features`` columns of ``x (N, F)``,
    standardised, with an L2 penalty ``l2`` on the weights (Newton's method; the loss is convex)."""
    columns = np.asarray(x, np.float64)[:, _columns(features)]
    shift, scale = columns.mean(axis=0), columns.std(axis=0) + 1e-9
    design = np.hstack([np.ones((len(columns), 1)), (columns - shift) / scale])
    target = np.asarray(y, np.float64)
    penalty = np.diag([0.0] + [l2] * columns.shape[1])
    theta = np.zeros(design.shape[1])
    for _ in range(100):
        p = _sigmoid(design @ theta)
        gradient = design.T @ (p - target) + penalty @ theta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + penalty + 1e-9 * np.eye(len(theta))
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return Calibration(
        "logistic", tuple(features), shift.tolist(), scale.tolist(), theta[1:].tolist(), float(theta[0])
    )


def fit_isotonic(x: np.ndarray, y: np.ndarray, feature: str) -> Calibration:
    """The non-decreasing map of one ``feature`` column of ``x (N, F)`` to the rate of ``y (N,)`` that fits
    it best in squared error (pool adjacent violators): flat over each pooled block (knots at its lowest and
    highest value), linear between blocks, flat beyond the ends."""
    values = np.asarray(x, np.float64)[:, _columns([feature])[0]]
    order = np.argsort(values, kind="stable")
    blocks: list[list[float]] = []  # [sum of y, count, lowest x, highest x]
    for v, t in zip(values[order], np.asarray(y, np.float64)[order], strict=True):
        blocks.append([t, 1.0, v, v])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            last = blocks.pop()
            blocks[-1] = [blocks[-1][0] + last[0], blocks[-1][1] + last[1], blocks[-1][2], last[3]]
    knots_x: list[float] = []
    knots_y: list[float] = []
    for total, count, low, high in blocks:
        for edge in (low, high) if high > low else (low,):
            knots_x.append(float(edge))
            knots_y.append(total / count)
    return Calibration("isotonic", (feature,), knots_x=knots_x, knots_y=knots_y)


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of labels ``y (N,)`` under probabilities ``p (N,)``."""
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    y = np.asarray(y, np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if len(p) else 0.0


def reliability(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """The reliability diagram's data and the expected calibration error of probabilities ``p (N,)`` for
    labels ``y (N,)``: per equal-width bin its count, mean probability and rate of correct ones (None for an
    empty bin); ``ece`` = the count-weighted mean of |rate - mean probability| (0 without data)."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(index, minlength=bins)
    mean = np.bincount(index, weights=p, minlength=bins)
    rate = np.bincount(index, weights=y, minlength=bins)
    gap = np.abs(rate - mean).sum() / len(p) if len(p) else 0.0
    return {
        "edges": np.linspace(0.0, 1.0, bins + 1).tolist(),
        "count": count.tolist(),
        "mean_probability": [float(m / c) if c else None for m, c in zip(mean, count, strict=True)],
        "rate": [float(r / c) if c else None for r, c in zip(rate, count, strict=True)],
        "ece": float(gap),
    }
