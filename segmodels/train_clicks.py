"""Training the click head (click_head.py) with iterative click simulation, the trunk frozen.

Each sample is one instance (instance-balanced: every instance with a mask and an area of at least
``min_area`` px is equally likely, whatever its category), cropped as the predictor's zoom-in window crops it
(the object's larger side spans ``OBJECT_SHARE`` of the crop, with jitter of scale and centre), flipped at
random, with copy-paste augmentation (Ghiasi et al., 2021): another training instance pasted over the crop
at random, occluding part of the object, so the head learns that a neighbour is not the object.

The prompt starts as the annotator's first click (the deepest interior point, or a random interior point),
over either no previous mask or a perturbed copy of the true mask (shifted, grown or shrunk, as a mask from
another source would be). Then the head runs without gradients for 0..``max_iterations`` rounds, each adding
the simulated annotator's next click on the head's own errors (annotator.next_click) and feeding its
prediction back as the previous mask; the last round is trained. Loss: logistic plus soft IoU.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from segmodels.annotator import boundary_distance, deepest_point, next_click
from segmodels.backbones import fold_batchnorm
from segmodels.checkpoint import load_checkpoint
from segmodels.click_head import CROP, OBJECT_SHARE, ClickHead, click_maps
from segmodels.data import (
    EVALUATED_AREA,
    CocoInstances,
    Instance,
    crop_mask,
    crop_window,
    photometric_jitter,
    to_tensor,
)
from segmodels.device import resolve_device, to_device
from segmodels.train_common import fit_head, save_with_head

log = logging.getLogger(__name__)

# Targets are pooled to the head's stride-2 output.
TARGET_POOL = 2


@dataclass
class ClickTrainConfig:
    """``data``: COCO-format directory; ``split``: the images trained on; ``init``: checkpoint whose trunk
    the head reads (its other stages are kept); ``out``: where the checkpoint with the head goes."""

    data: str
    init: str
    out: str
    split: str = "train"
    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_iterations: int = 3
    min_area: float = EVALUATED_AREA
    paste_probability: float = 0.5
    previous_mask_probability: float = 0.5
    seed: int = 0
    device: str = "auto"


class ClickSampler:
    """Training crops for the click head: see the module docstring."""

    def __init__(self, dataset: CocoInstances, min_area: float, paste_probability: float, seed: int) -> None:
        self.dataset = dataset
        self.instances: list[Instance] = dataset.masked_instances(min_area)
        self.paste_probability = paste_probability
        self.rng = np.random.default_rng(seed)

    def _crop(self, inst: Instance, side: float, jitter: float) -> tuple[np.ndarray, np.ndarray]:
        scale = side / inst.size * 2.0 ** self.rng.uniform(-jitter, jitter)
        cx, cy = inst.centre
        dx, dy = self.rng.uniform(-0.15, 0.15, size=2) * inst.size
        flip = bool(self.rng.integers(2))
        centre = (cx + dx, cy + dy)
        image = crop_window(self.dataset.pyramid(inst.image_index), centre, scale, flip, CROP)
        mask = crop_mask(self.dataset.mask_u8(inst), centre, scale, flip, CROP) > 0
        return image, mask

    def _paste(self, image: np.ndarray, target: np.ndarray) -> None:
        """Paste another instance (its mask's pixels) at a random place and size, over ``image``."""
        other = self.instances[self.rng.integers(len(self.instances))]
        patch, mask = self._crop(other, self.rng.uniform(0.2, 0.6) * CROP, 0.0)
        shift = self.rng.integers(-CROP // 2, CROP // 2, size=2)
        m = np.array([[1, 0, shift[0]], [0, 1, shift[1]]], np.float32)
        mask = cv2.warpAffine(mask.astype(np.uint8), m, (CROP, CROP), flags=cv2.INTER_NEAREST) > 0
        patch = cv2.warpAffine(patch, m, (CROP, CROP), flags=cv2.INTER_LINEAR)
        image[mask] = patch[mask]
        target &= ~mask

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """``(192, 192, 3) uint8`` crop and ``(192, 192) bool`` target (never empty)."""
        while True:
            inst = self.instances[self.rng.integers(len(self.instances))]
            image, target = self._crop(inst, OBJECT_SHARE * CROP, 0.4)
            if self.rng.random() < self.paste_probability:
                self._paste(image, target)
            if target.sum() >= 16:
                return image, target

    def first_click(self, target: np.ndarray) -> tuple[float, float]:
        """The deepest interior point half the time, else a random point at least a third as deep."""
        depth = boundary_distance(target)
        if self.rng.random() < 0.5:
            return deepest_point(depth)
        rows, cols = np.nonzero(depth >= depth.max() / 3)
        k = self.rng.integers(len(rows))
        return float(cols[k]) + 0.5, float(rows[k]) + 0.5

    def perturbed(self, target: np.ndarray) -> np.ndarray:
        """A plausible imperfect mask of the object: shifted by up to 10% and grown or shrunk."""
        size = max(int(np.ptp(np.nonzero(target)[0])), int(np.ptp(np.nonzero(target)[1])), 8)
        dx, dy = (self.rng.uniform(-0.1, 0.1, size=2) * size).astype(int)
        moved = np.roll(target, (int(dy), int(dx)), axis=(0, 1)).astype(np.uint8)
        radius = int(self.rng.integers(1, max(2, size // 8)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        op = cv2.dilate if self.rng.random() < 0.5 else cv2.erode
        return op(moved, kernel) > 0


@dataclass
class Episode:
    """One sample's prompt: clicks in crop pixels ``[(x, y), ...]``, labels, previous mask ``(192, 192)``."""

    target: np.ndarray
    points: list[tuple[float, float]]
    labels: list[int]
    previous: np.ndarray

    def prompts(self) -> np.ndarray:
        maps = click_maps(np.array(self.points, np.float64).reshape(-1, 2), np.array(self.labels))
        return np.concatenate([maps, self.previous[None].astype(np.float32)])


def prompt_batch(episodes: list[Episode]) -> torch.Tensor:
    """``(B, 3, 192, 192) float32`` prompt maps of the episodes."""
    return torch.from_numpy(np.stack([e.prompts() for e in episodes]))


def upsampled_probability(logits: torch.Tensor) -> np.ndarray:
    """``(B, 96, 96)`` logits -> ``(B, 192, 192) float32`` probabilities over the crop."""
    up = F.interpolate(logits[:, None], size=(CROP, CROP), mode="bilinear", align_corners=False)[:, 0]
    return torch.sigmoid(up).numpy()


def click_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logistic loss plus (1 - soft IoU) of ``(B, 96, 96)`` logits against ``(B, 192, 192)`` {0, 1}."""
    small = F.avg_pool2d(targets[:, None], TARGET_POOL)[:, 0]
    bce = F.binary_cross_entropy_with_logits(logits, small)
    p = torch.sigmoid(logits)
    inter = (p * small).sum((1, 2))
    union = (p + small - p * small).sum((1, 2)).clamp_min(1.0)
    return bce + (1.0 - inter / union).mean()


def fit_click_head(
    head: ClickHead,
    trunk: torch.nn.Module,
    dataset: CocoInstances,
    config: ClickTrainConfig,
    on_step: Callable[[float], None] | None = None,
) -> list[float]:
    """Train ``head`` in place for ``config.steps`` steps on ``dataset``, reading a BatchNorm-folded copy of
    ``trunk`` (never changed); ``on_step(loss)`` after each step. Returns the loss of every step."""
    device = next(head.parameters()).device
    frozen = fold_batchnorm(copy.deepcopy(trunk)).eval().to(device).to(memory_format=torch.channels_last)
    frozen.requires_grad_(False)
    sampler = ClickSampler(dataset, config.min_area, config.paste_probability, config.seed)
    return fit_head(
        head,
        lambda: _step(head, frozen, sampler, config, device),
        config.steps,
        config.lr,
        config.weight_decay,
        on_step,
    )


def train_click_head(config: ClickTrainConfig) -> Path:
    """``segmask train clicks``: the ``config.init`` checkpoint with a new click head trained on
    ``config.split``, written to ``config.out`` (with a ``training.clicks`` record and a ``clicks`` stage)."""
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    model, meta = load_checkpoint(config.init, device)
    model.config.click_head = True
    model.click_head = ClickHead(model.trunk.tap_channels).to(device)
    dataset = CocoInstances(config.data, config.split)
    start = time.perf_counter()
    with tqdm(total=config.steps, desc="click head", unit="step", dynamic_ncols=True) as bar:

        def advance(loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update()

        curve = fit_click_head(model.click_head, model.trunk, dataset, config, advance)
    seconds = time.perf_counter() - start
    log.info("click head: %d steps in %.0f s, final loss %.3f", config.steps, seconds, np.mean(curve[-100:]))
    record = {**asdict(config), "seconds": round(seconds, 1)}
    return save_with_head(model, meta, "clicks", record, curve, device, config.out)


def _step(
    head: ClickHead,
    trunk: torch.nn.Module,
    sampler: ClickSampler,
    config: ClickTrainConfig,
    device: torch.device,
) -> torch.Tensor:
    """One training step's loss: a batch, its simulated clicks (the head's own errors), the last forward."""
    crops, targets = zip(*(sampler.sample() for _ in range(config.batch_size)), strict=True)
    with torch.no_grad():
        taps = trunk(to_device(photometric_jitter(to_tensor(list(crops)), sampler.rng), device))
    episodes = []
    for target in targets:
        use_previous = sampler.rng.random() < config.previous_mask_probability
        previous = sampler.perturbed(target) if use_previous else np.zeros_like(target)
        episodes.append(Episode(target, [sampler.first_click(target)], [1], previous.astype(np.float32)))
    head.eval()
    with torch.no_grad():
        for _ in range(int(sampler.rng.integers(0, config.max_iterations + 1))):
            probability = upsampled_probability(head(taps, prompt_batch(episodes).to(device)).cpu())
            for episode, p in zip(episodes, probability, strict=True):
                episode.previous = p
                click = next_click(p > 0.5, episode.target)
                if click is not None:
                    episode.points.append(click[0])
                    episode.labels.append(click[1])
    head.train()
    logits = head(taps, prompt_batch(episodes).to(device))
    return click_loss(logits, torch.from_numpy(np.stack(targets).astype(np.float32)).to(device))
