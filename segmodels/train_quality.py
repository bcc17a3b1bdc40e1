"""Training the quality head (quality_head.py) on a checkpoint's own first-click candidates, everything else
frozen.

Samples: every instance with a mask and an area above ``min_area`` px (as the evaluation counts them), on
the image and (``flips``) its mirror image. Each gets clicks at the simulated annotator's first-click point
(annotator.click_point) and at ``extra_clicks`` random interior points at least a third as deep (real first
clicks are not always at the deepest point). Each click's candidate windows are exactly the predictor's
(``MaskPredictor.coarse_windows``), with the head's inputs (``MaskPredictor.quality_inputs``) computed once
without gradients; the target of a window is the IoU with the instance of its mask as the click path makes
it (refined when the checkpoint refines, at the click threshold).

Fitting: each step draws ``batch_size`` instances uniformly (instance-balanced, whatever their size or
category) and one of their clicks each; the loss is the logistic loss of the predicted IoU against the IoU,
over every candidate of the drawn clicks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from segmodels.annotator import annotator_clicks
from segmodels.checkpoint import load_checkpoint
from segmodels.data import CocoInstances
from segmodels.device import resolve_device
from segmodels.predictor import MaskPredictor, paste_window
from segmodels.quality_head import FEATURES, QualityHead
from segmodels.train_common import fit_head, save_with_head

log = logging.getLogger(__name__)


@dataclass
class QualityTrainConfig:
    """``data``: COCO-format directory; ``split``: the images trained on (``max_images``: only the first N
    by id); ``init``: the checkpoint whose candidates the head ranks (kept whole); ``out``: where the
    checkpoint with the head goes."""

    data: str
    init: str
    out: str
    split: str = "train"
    max_images: int | None = None
    extra_clicks: int = 4
    flips: bool = True
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    min_area: float = 32.0**2
    seed: int = 0
    device: str = "auto"


@dataclass
class QualitySamples:
    """The candidates of every click, padded to ``G`` windows: ``embeddings (C, G, 512)``, ``features (C, G,
    F)``, ``targets (C, G)`` IoU, ``valid (C, G)`` bool (False for padding), and ``instance (C,)``: the
    training instance each click belongs to."""

    embeddings: torch.Tensor
    features: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    instance: np.ndarray

    @property
    def clicks_by_instance(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.instance == i) for i in np.unique(self.instance)]


def window_iou(logits: np.ndarray, box: np.ndarray, gt: np.ndarray, threshold_logit: float) -> float:
    """IoU with ``gt (H, W) bool`` of window logits ``(S, S)`` over ``box`` (xyxy image pixels) thresholded
    at ``threshold_logit``, as the predictor pastes them onto the image."""
    region, (y0, y1, x0, x1) = paste_window(logits, box, *gt.shape)
    mask = region > threshold_logit
    inter = int((mask & gt[y0:y1, x0:x1]).sum())
    union = int(gt.sum()) + int(mask.sum()) - inter
    return inter / union if union else 0.0


def click_samples(
    predictor: MaskPredictor, point: np.ndarray, gt: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The head's inputs and targets for a first click at image pixel ``point (x, y)`` on the predictor's
    image, for the object ``gt (H, W) bool``: embeddings ``(N, 512)``, features ``(N, F)``, IoU ``(N,)``."""
    cands, coarse = predictor.coarse_windows(point[None])
    embeddings, features = predictor.quality_inputs(cands, coarse, point)
    final = predictor.window_logits(cands)
    t = predictor.threshold_logit
    iou = np.array([window_iou(lg, w.box, gt, t) for w, lg in zip(coarse, final, strict=True)], np.float32)
    return embeddings.cpu(), features.cpu(), iou


def collect_samples(
    predictor: MaskPredictor,
    dataset: CocoInstances,
    config: QualityTrainConfig,
    on_image: Callable[[], None] | None = None,
) -> QualitySamples:
    """Every training click's candidates (see the module docstring), the trunk, DeepMask and SharpMask
    frozen; ``on_image()`` after each image. ``ValueError`` when no instance qualifies."""
    rng = np.random.default_rng(config.seed)
    rows: list[tuple[torch.Tensor, torch.Tensor, np.ndarray, int]] = []
    indices = sorted(range(len(dataset)), key=lambda i: dataset.images[i]["id"])[: config.max_images]
    for index in tqdm(indices, desc="quality samples", unit="image", dynamic_ncols=True):
        instances = [i for i in dataset.instances_by_image[index] if i.has_mask and i.area > config.min_area]
        if on_image is not None:
            on_image()
        if not instances:
            continue
        image = dataset.image(index)
        for flip in (False, True) if config.flips else (False,):
            predictor.set_image(np.ascontiguousarray(image[:, ::-1]) if flip else image)
            for inst in instances:
                gt = dataset.mask(inst)[:, ::-1] if flip else dataset.mask(inst)
                points = annotator_clicks(gt, config.extra_clicks, rng)
                rows += [(*click_samples(predictor, p, gt), inst.index) for p in points]
    if not rows:
        raise ValueError(f"no instance with a mask and area > {config.min_area} px in {dataset.root}")
    width = max(len(iou) for _, _, iou, _ in rows)
    samples = QualitySamples(
        torch.zeros(len(rows), width, rows[0][0].shape[1]),
        torch.zeros(len(rows), width, len(FEATURES)),
        torch.zeros(len(rows), width),
        torch.zeros(len(rows), width, dtype=torch.bool),
        np.array([inst for *_, inst in rows]),
    )
    for c, (embeddings, features, iou, _) in enumerate(rows):
        n = len(iou)
        samples.embeddings[c, :n], samples.features[c, :n] = embeddings, features
        samples.targets[c, :n], samples.valid[c, :n] = torch.from_numpy(iou), True
    return samples


def fit_quality_head(
    head: QualityHead,
    samples: QualitySamples,
    config: QualityTrainConfig,
    on_step: Callable[[float], None] | None = None,
    standardise: bool = True,
) -> list[float]:
    """Train ``head`` in place for ``config.steps`` steps (see the module docstring), after fitting its input
    standardisation to ``samples`` when ``standardise`` (a head that continues training keeps its own);
    ``on_step(loss)`` after each step. Returns the loss of every step."""
    device = next(head.parameters()).device
    valid = samples.valid
    if standardise:
        head.standardise(samples.embeddings[valid].to(device), samples.features[valid].to(device))
    rng = np.random.default_rng(config.seed)
    by_instance = samples.clicks_by_instance

    def step_loss() -> torch.Tensor:
        drawn = rng.integers(len(by_instance), size=config.batch_size)
        clicks = torch.from_numpy(np.array([rng.choice(by_instance[i]) for i in drawn]))
        keep = valid[clicks]
        logits = head.logits(
            samples.embeddings[clicks][keep].to(device), samples.features[clicks][keep].to(device)
        )
        return F.binary_cross_entropy_with_logits(logits, samples.targets[clicks][keep].to(device))

    return fit_head(head, step_loss, config.steps, config.lr, config.weight_decay, on_step)


def train_quality_head(config: QualityTrainConfig) -> Path:
    """``segmask train quality``: the ``config.init`` checkpoint with a new quality head trained on
    ``config.split``, written to ``config.out`` (with a ``training.quality`` record and a ``quality``
    stage)."""
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    model, meta = load_checkpoint(config.init, device)
    predictor = MaskPredictor(model, meta, device)
    dataset = CocoInstances(config.data, config.split)
    start = time.perf_counter()
    samples = collect_samples(predictor, dataset, config)
    collected = time.perf_counter() - start
    model.config.quality_head = True
    model.quality_head = QualityHead(model.config.embed_dim).to(device)
    with tqdm(total=config.steps, desc="quality head", unit="step", dynamic_ncols=True) as bar:

        def advance(loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update()

        curve = fit_quality_head(model.quality_head, samples, config, advance)
    seconds = time.perf_counter() - start
    log.info(
        "quality head: %d clicks of %d instances in %.0f s, %d steps, %.0f s in all, final loss %.4f",
        len(samples.instance),
        len(samples.clicks_by_instance),
        collected,
        config.steps,
        seconds,
        np.mean(curve[-100:]),
    )
    record = {
        **asdict(config),
        "clicks": len(samples.instance),
        "instances": len(samples.clicks_by_instance),
        "windows": int(samples.valid.sum()),
        "seconds_collecting": round(collected, 1),
        "seconds": round(seconds, 1),
    }
    return save_with_head(model, meta, "quality", record, curve, device, config.out)
