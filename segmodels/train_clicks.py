"""Training the click head (click_head.py) with iterative click simulation, the trunk frozen.

Each sample is one instance (instance-balanced: every instance with a mask and an area of at least
``min_area`` px is equally likely, whatever its category), cropped as the predictor's zoom-in window crops it
(the object's larger side spans ``OBJECT_SHARE`` of the crop, with jitter of scale and centre), flipped at
random, with copy-paste augmentation (Ghiasi et al., 2021): another training instance pasted over the crop
at random, occluding part of the object, so the head learns that a neighbour is not the object.

The prompt starts as the annotator's first click (the deepest interior point, or a random interior point),
over either no previous mask or a perturbed copy of the true mask (shifted, grown or shrunk, as a mask from
another source would be). With chance ``window_probability`` a sample is framed as the predictor frames a
first click instead: the previous mask is a DeepMask-window-like mask of the object (a fragment of it around
the click, or the object spilling over its surroundings or a neighbour), and the crop is the zoom window of
that mask and the click, so the object may be far smaller than the crop or run over its edge.

Then the head runs without gradients for 0..``max_iterations`` rounds, each adding the simulated annotator's
next click on the head's own errors (annotator.next_click) and feeding its prediction back as the previous
mask; the last round is trained. Without ``corrections`` a round only feeds the prediction back, the click
staying the first one alone, as a first click's second step sees it. Loss: logistic plus soft IoU.
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
from segmodels.click_head import CROP, OBJECT_SHARE, ClickHead, click_maps, crop_points, zoom_window
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
from segmodels.geometry import mask_to_box
from segmodels.train_common import fit_head, save_with_head

log = logging.getLogger(__name__)

# Targets are pooled to the head's stride-2 output.
TARGET_POOL = 2
# The share of a first-click head's training crops framed like a first click (30, 60 and 100% measured
# within noise of each other on the tune split); the rest are framed on the object, as its second step sees.
FIRST_CLICK_WINDOW_PROBABILITY = 0.3


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
    corrections: bool = True
    min_area: float = EVALUATED_AREA
    paste_probability: float = 0.5
    previous_mask_probability: float = 0.5
    window_probability: float = 0.0
    seed: int = 0
    device: str = "auto"


@dataclass
class Sample:
    """A training crop ``(192, 192, 3) uint8``, its target ``(192, 192) bool`` (never empty) and, for a
    sample framed as a first click is, the previous mask ``(192, 192) bool`` and the click (crop pixels)."""

    image: np.ndarray
    target: np.ndarray
    previous: np.ndarray | None = None
    click: tuple[float, float] | None = None


class ClickSampler:
    """Training crops for the click head: see the module docstring."""

    def __init__(
        self,
        dataset: CocoInstances,
        min_area: float,
        paste_probability: float,
        seed: int,
        window_probability: float = 0.0,
    ) -> None:
        if not 0.0 <= window_probability <= 1.0:
            raise ValueError(f"window_probability is a probability in [0, 1], got {window_probability}")
        self.dataset = dataset
        self.instances: list[Instance] = dataset.masked_instances(min_area)
        self.paste_probability, self.window_probability = paste_probability, window_probability
        self.rng = np.random.default_rng(seed)

    def _crop(self, inst: Instance, side: float, jitter: float) -> tuple[np.ndarray, np.ndarray]:
        scale = side / inst.size * 2.0 ** self.rng.uniform(-jitter, jitter)
        cx, cy = inst.centre
        dx, dy = self.rng.uniform(-0.15, 0.15, size=2) * inst.size
        return self._window(inst, (cx + dx, cy + dy), scale, bool(self.rng.integers(2)))

    def _window(
        self, inst: Instance, centre: tuple[float, float], scale: float, flip: bool
    ) -> tuple[np.ndarray, np.ndarray]:
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

    def sample(self) -> Sample:
        """A crop centred on its object, or (chance ``window_probability``) framed as a first click is."""
        while True:
            inst = self.instances[self.rng.integers(len(self.instances))]
            # Drawn only when asked for, so that a recipe without framed crops keeps its random stream.
            if self.window_probability and self.rng.random() < self.window_probability:
                drawn = self._first_click_view(inst)
            else:
                drawn = Sample(*self._crop(inst, OBJECT_SHARE * CROP, 0.4))
            if self.rng.random() < self.paste_probability:
                self._paste(drawn.image, drawn.target)
            if drawn.target.sum() >= 16 and _on(drawn.target, drawn.click):
                return drawn

    def _first_click_view(self, inst: Instance) -> Sample:
        """The object as the predictor's first click sees it: a window-like mask of it around the
        annotator's click (:meth:`window_like_mask`) and the crop of that mask's zoom window with the
        click."""
        full = self.dataset.mask(inst)
        click = self.first_click(full)
        previous = self.window_like_mask(full, click, inst)
        centre, scale = zoom_window(mask_to_box(previous), np.array([click]))
        flip = bool(self.rng.integers(2))
        image, target = self._window(inst, centre, scale, flip)
        previous_u8 = previous.astype(np.uint8) * 255
        crop_previous = crop_mask(previous_u8, centre, scale, flip, CROP) > 0
        x, y = crop_points(np.array([click]), centre, scale)[0]
        if flip:  # the warp mirrors crop pixel j to CROP - j, whose centre is at CROP + 1 - x
            x = CROP + 1 - x
        return Sample(image, target, crop_previous, (float(x), float(y)))

    def window_like_mask(self, full: np.ndarray, click: tuple[float, float], inst: Instance) -> np.ndarray:
        """``(H, W) bool``: what a DeepMask window at the wrong scale gives for the object ``full`` around
        ``click`` (image pixels): the part of it inside an ellipse near the click 0.3-0.8 of its size
        (a window too small), or (a third of the time) the object grown into its surroundings, with a
        neighbouring instance of the image half of those times (a window too large)."""
        x, y = click
        if self.rng.random() < 2 / 3:
            half = self.rng.uniform(0.15, 0.4, size=2) * inst.size
            # Off-centre by at most 0.7 of each half-axis: 2 * 0.7^2 < 1 keeps the click inside the ellipse.
            cx, cy = np.array([x, y]) + self.rng.uniform(-0.7, 0.7, size=2) * half
            window = np.zeros(full.shape, np.uint8)
            axes = (max(int(half[0]), 1), max(int(half[1]), 1))
            cv2.ellipse(window, (int(cx), int(cy)), axes, 0.0, 0.0, 360.0, 1, -1)
            part = full & (window > 0)
            return part if part.any() else full
        radius = max(1, int(self.rng.uniform(0.05, 0.2) * inst.size))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        grown = cv2.dilate(full.astype(np.uint8), kernel) > 0
        neighbours = [
            o
            for o in self.dataset.instances_by_image[inst.image_index]
            if o.has_mask and o.annotation_id != inst.annotation_id
        ]
        if neighbours and self.rng.random() < 0.5:
            grown |= self.dataset.mask(neighbours[self.rng.integers(len(neighbours))])
        return grown

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


def _on(target: np.ndarray, click: tuple[float, float] | None) -> bool:
    """Whether ``click`` (crop pixels; None: chosen later, on the target) lies on ``target``, within a pixel
    (a pasted instance can hide the object under it)."""
    if click is None:
        return True
    col, row = int(click[0]), int(click[1])
    return bool(target[max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2].any())


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
    sampler = ClickSampler(
        dataset, config.min_area, config.paste_probability, config.seed, config.window_probability
    )
    return fit_head(
        head,
        lambda: _step(head, frozen, sampler, config, device),
        config.steps,
        config.lr,
        config.weight_decay,
        on_step,
    )


def train_click_head(config: ClickTrainConfig, first_click: bool = False) -> Path:
    """``segmask train clicks``: the ``config.init`` checkpoint with a new click head trained on
    ``config.split``, written to ``config.out`` (with a ``training.clicks`` record and a ``clicks`` stage).
    ``first_click`` (``segmask train first-click``): the head for a first click's steps instead
    (``first_click_head``, stage ``first-click``); the checkpoint keeps its click head for the rest."""
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    model, meta = load_checkpoint(config.init, device)
    if first_click and model.click_head is None:
        raise ValueError(f"{config.init} has no click head: train one first (segmask train clicks)")
    head = ClickHead(model.trunk.tap_channels).to(device)
    if first_click:
        model.config.first_click_head, model.first_click_head = True, head
    else:
        model.config.click_head, model.click_head = True, head
    stage = "first-click" if first_click else "clicks"
    dataset = CocoInstances(config.data, config.split)
    start = time.perf_counter()
    with tqdm(total=config.steps, desc=f"{stage} head", unit="step", dynamic_ncols=True) as bar:

        def advance(loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update()

        curve = fit_click_head(head, model.trunk, dataset, config, advance)
    seconds = time.perf_counter() - start
    log.info(
        "%s head: %d steps in %.0f s, final loss %.3f", stage, config.steps, seconds, np.mean(curve[-100:])
    )
    record = {**asdict(config), "seconds": round(seconds, 1)}
    return save_with_head(model, meta, stage, record, curve, device, config.out)


def feed_back(episode: Episode, probability: np.ndarray, config: ClickTrainConfig) -> None:
    """The next simulated round of ``episode`` after the head predicted ``probability (192, 192)`` in [0, 1]:
    the prediction becomes the previous mask and, with ``config.corrections``, the annotator's next click on
    its errors is added."""
    episode.previous = probability
    if not config.corrections:
        return
    click = next_click(probability > 0.5, episode.target)
    if click is not None:
        episode.points.append(click[0])
        episode.labels.append(click[1])


def _step(
    head: ClickHead,
    trunk: torch.nn.Module,
    sampler: ClickSampler,
    config: ClickTrainConfig,
    device: torch.device,
) -> torch.Tensor:
    """One training step's loss: a batch, its simulated clicks (the head's own errors), the last forward."""
    samples = [sampler.sample() for _ in range(config.batch_size)]
    targets = [s.target for s in samples]
    with torch.no_grad():
        taps = trunk(
            to_device(photometric_jitter(to_tensor([s.image for s in samples]), sampler.rng), device)
        )
    episodes = []
    for s in samples:
        if s.previous is not None and s.click is not None:
            episodes.append(Episode(s.target, [s.click], [1], s.previous.astype(np.float32)))
            continue
        use_previous = sampler.rng.random() < config.previous_mask_probability
        previous = sampler.perturbed(s.target) if use_previous else np.zeros_like(s.target)
        episodes.append(Episode(s.target, [sampler.first_click(s.target)], [1], previous.astype(np.float32)))
    head.eval()
    with torch.no_grad():
        for _ in range(int(sampler.rng.integers(0, config.max_iterations + 1))):
            probability = upsampled_probability(head(taps, prompt_batch(episodes).to(device)).cpu())
            for episode, p in zip(episodes, probability, strict=True):
                feed_back(episode, p, config)
    head.train()
    logits = head(taps, prompt_batch(episodes).to(device))
    return click_loss(logits, torch.from_numpy(np.stack(targets).astype(np.float32)).to(device))
