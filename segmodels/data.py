"""COCO-format instances and the DeepMask window-sampling protocol (docs/papers.md).

Images are ``(H, W, 3) uint8 RGB``; instance masks ``bool (H, W)``; boxes COCO ``xywh`` pixels.
Training inputs are ``(B, 3, 192, 192) float32 in [0, 1]``; mask targets ``(B, 160, 160)`` in {0, 1}
covering the central window.

The fixed validation split (segmodels.splits): an image is held out when ``image_id % 5 == 0`` (21 of the
104 COCO128 images); every reported number uses it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
import torch

from segmodels.annotator import annotator_clicks
from segmodels.deepmask import CONTEXT, INPUT, OBJECT, WINDOW
from segmodels.geometry import coco_segmentation_to_mask
from segmodels.splits import in_split

# Grey used outside the image: the ImageNet mean, so padding normalises to ~0.
PAD_VALUE = (124, 116, 104)
MIN_AREA = 100
SHIFT = 16
SCALE_JITTER = 0.25
NEG_MIN_OFFSET = 48
NEG_SCALE_OCTAVES = (1.0, 2.0)
RANDOM_NEG_SCALES = (-3.0, 1.0)
MASK_SAMPLING = ("category", "instance")
# The smallest objects evaluated (COCO's medium and large): instance sampling draws among these.
EVALUATED_AREA = 32.0**2
# Random interior clicks drawn once per instance for click-centred mask windows.
CLICKS_PER_INSTANCE = 32


def has_segmentation(segmentation: list | dict | None) -> bool:
    """Whether a COCO ``segmentation`` describes a mask: an RLE dict, or a list holding at least one polygon
    of three vertices. Box-only annotations (e.g. Label Studio rectangles) have ``[]``."""
    if isinstance(segmentation, dict):
        return bool(segmentation)
    return any(len(polygon) >= 6 for polygon in segmentation or [])


@dataclass(frozen=True)
class Instance:
    """One non-crowd annotation: ``box`` is COCO xywh in pixels. ``has_mask`` is False for box-only
    annotations (empty ``segmentation``): they are objects, but never mask targets."""

    index: int
    image_index: int
    annotation_id: int
    category_id: int
    box: tuple[float, float, float, float]
    area: float
    has_mask: bool = True

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2

    @property
    def size(self) -> float:
        return max(self.box[2], self.box[3])


def annotation_area(annotation: dict) -> float:
    """COCO ``area``; for a box-only annotation without one (or with 0), the area of its ``bbox``."""
    area = annotation.get("area") or 0.0
    if area or has_segmentation(annotation.get("segmentation")):
        return area
    return annotation["bbox"][2] * annotation["bbox"][3]


class CocoInstances:
    """A COCO-format directory (``instances.json`` + ``images/``) restricted to one split, and to the images
    ``image_ids`` when given (ids absent from the data are an error).

    Decoded images, their pyramids and instance masks are cached in memory (COCO128 needs ~0.5 GB).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        min_area: float = MIN_AREA,
        image_ids: Iterable[int] | None = None,
    ) -> None:
        self.root = Path(root)
        coco = json.loads((self.root / "instances.json").read_text())
        self.categories = {c["id"]: c["name"] for c in coco["categories"]}
        self.images = [im for im in coco["images"] if in_split(im["id"], split)]
        if image_ids is not None:
            wanted = set(image_ids)
            missing = wanted - {im["id"] for im in self.images}
            if missing:
                raise ValueError(f"image ids {sorted(missing)[:10]} are not in {root} (split {split})")
            self.images = [im for im in self.images if im["id"] in wanted]
        index_of = {im["id"]: i for i, im in enumerate(self.images)}
        self.annotations = [a for a in coco["annotations"] if a["image_id"] in index_of]
        usable = [
            a
            for a in self.annotations
            if not a.get("iscrowd", 0) and annotation_area(a) >= min_area and min(a["bbox"][2:]) >= 1
        ]
        self.instances = [
            Instance(
                k,
                index_of[a["image_id"]],
                a["id"],
                a["category_id"],
                tuple(a["bbox"]),
                annotation_area(a),
                has_segmentation(a.get("segmentation")),
            )
            for k, a in enumerate(usable)
        ]
        self._annotation_by_id = {a["id"]: a for a in self.annotations}
        self._images: dict[int, np.ndarray] = {}
        self._pyramids: dict[int, list[np.ndarray]] = {}
        self._masks: dict[int, np.ndarray] = {}
        self._masks_u8: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.images)

    @cached_property
    def instances_by_image(self) -> list[list[Instance]]:
        out: list[list[Instance]] = [[] for _ in self.images]
        for inst in self.instances:
            out[inst.image_index].append(inst)
        return out

    @cached_property
    def instances_by_category(self) -> dict[int, list[Instance]]:
        out: dict[int, list[Instance]] = {}
        for inst in self.instances:
            out.setdefault(inst.category_id, []).append(inst)
        return out

    def image_path(self, image_index: int) -> Path:
        return self.root / "images" / self.images[image_index]["file_name"]

    def image(self, image_index: int) -> np.ndarray:
        if image_index not in self._images:
            path = self.image_path(image_index)
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise FileNotFoundError(f"cannot read image {path}")
            self._images[image_index] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return self._images[image_index]

    def pyramid(self, image_index: int) -> list[np.ndarray]:
        if image_index not in self._pyramids:
            self._pyramids[image_index] = image_pyramid(self.image(image_index))
        return self._pyramids[image_index]

    def mask(self, inst: Instance) -> np.ndarray:
        if inst.annotation_id not in self._masks:
            im = self.images[inst.image_index]
            ann = self._annotation_by_id[inst.annotation_id]
            self._masks[inst.annotation_id] = coco_segmentation_to_mask(
                ann["segmentation"], im["height"], im["width"]
            )
        return self._masks[inst.annotation_id]

    def masked_instances(self, min_area: float) -> list[Instance]:
        """The instances with a mask and an area of at least ``min_area`` px (ValueError when none has)."""
        found = [inst for inst in self.instances if inst.has_mask and inst.area >= min_area]
        if not found:
            raise ValueError(f"no instance with a mask and area >= {min_area} px in {self.root}")
        return found

    def mask_u8(self, inst: Instance) -> np.ndarray:
        """The instance mask as ``uint8`` 0/255, the form warps read (cached)."""
        if inst.annotation_id not in self._masks_u8:
            self._masks_u8[inst.annotation_id] = self.mask(inst).astype(np.uint8) * 255
        return self._masks_u8[inst.annotation_id]


def image_pyramid(image: np.ndarray) -> list[np.ndarray]:
    """Level k is ``image`` downscaled by 2^k (Gaussian pyramid), so :func:`crop_window` never aliases."""
    levels = [image]
    while min(levels[-1].shape[:2]) >= 64:
        levels.append(cv2.pyrDown(levels[-1]))
    return levels


def window_transform(centre: tuple[float, float], scale: float, flip: bool, out_size: int) -> np.ndarray:
    """2x3 affine map from image pixels to an ``out_size`` crop centred on ``centre``.

    ``scale`` is crop pixels per image pixel; ``flip`` mirrors the crop horizontally about its centre.
    """
    sx = -scale if flip else scale
    cx, cy = centre
    half = out_size / 2
    return np.array([[sx, 0.0, half - sx * cx], [0.0, scale, half - scale * cy]], dtype=np.float64)


def crop_window(
    pyramid: list[np.ndarray],
    centre: tuple[float, float],
    scale: float,
    flip: bool = False,
    size: int = INPUT,
) -> np.ndarray:
    """``(size, size, 3) uint8`` crop at ``scale`` around ``centre``, read from the pyramid level whose
    resolution is closest above the target (so downscaling by more than 2x does not alias)."""
    level = min(max(0, math.floor(-math.log2(scale))), len(pyramid) - 1)
    m = window_transform((centre[0] / 2**level, centre[1] / 2**level), scale * 2**level, flip, size)
    return cv2.warpAffine(
        pyramid[level],
        m,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=PAD_VALUE,
    )


def crop_mask(
    mask: np.ndarray, centre: tuple[float, float], scale: float, flip: bool, size: int = WINDOW
) -> np.ndarray:
    """``(size, size) float32`` {0, 1} crop of a ``uint8`` 0/255 mask, geometry of :func:`crop_window`."""
    m = window_transform(centre, scale, flip, size)
    warped = cv2.warpAffine(mask, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    return (warped >= 128).astype(np.float32)


def photometric_jitter(batch: torch.Tensor, rng: np.random.Generator, strength: float = 0.2) -> torch.Tensor:
    """Random per-sample saturation, contrast and brightness of ``(B, 3, H, W) float32 in [0, 1]``: with ~80
    training images the trainable trunk stages otherwise memorise their colours."""
    f = torch.from_numpy(
        rng.uniform(1 - strength, 1 + strength, size=(3, len(batch), 1, 1, 1)).astype(np.float32)
    )
    grey = batch.mean(dim=1, keepdim=True)
    x = grey + (batch - grey) * f[0]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * f[1]
    return (x * f[2]).clamp_(0.0, 1.0)


def to_tensor(crops: list[np.ndarray]) -> torch.Tensor:
    """List of ``(H, W, 3) uint8`` -> ``(B, 3, H, W) float32 in [0, 1]``."""
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255.0)


class WindowSampler:
    """The papers' sampling over a :class:`CocoInstances` split.

    - mask samples: a uniformly drawn category, a random instance of it, scale jitter of +-1/4 octave around
      the canonical size, shift of +-16 px, random flip; the target is the instance's mask in the window.
      Only instances with a mask count here (box-only annotations are no mask targets). A share
      ``click_centred`` of them is centred on an annotator's click instead of the box centre: the object's
      deepest interior point or, as often, a random one at least a third as deep (where people click), with
      the same shift, which covers the 2x2 windows nearest a click that the predictor reads. With
      ``mask_sampling="instance"`` the instance is drawn uniformly among those with a mask of at least
      32x32 px (the objects evaluated), not by category. With chance ``paste_probability``, copy-paste
      (Ghiasi et al., 2021): another instance is pasted over the window at 0.2-0.6 of its side and a random
      place, hiding what it covers of the target, unless it would hide more than half of it;
    - score samples: 50% positives drawn as above (box-only instances included: a box is enough to centre
      and scale an object); 50% negatives, half of them centred on an instance at a scale 1-2 octaves off,
      half random windows (scales 2^-3..2^1) whose centre is >= 48 px from every object centre or whose
      scale is off by an octave or more.
    """

    def __init__(
        self,
        dataset: CocoInstances,
        seed: int = 0,
        augment: bool = True,
        click_centred: float = 0.0,
        mask_sampling: str = "category",
        paste_probability: float = 0.0,
    ) -> None:
        if not 0.0 <= click_centred <= 1.0:
            raise ValueError(f"click_centred is a share in [0, 1], got {click_centred}")
        if not 0.0 <= paste_probability <= 1.0:
            raise ValueError(f"paste_probability is a probability in [0, 1], got {paste_probability}")
        if mask_sampling not in MASK_SAMPLING:
            raise ValueError(f"mask_sampling is one of {MASK_SAMPLING}, got {mask_sampling!r}")
        if not dataset.instances:
            raise ValueError(f"no instances with area >= {MIN_AREA} in {dataset.root}")
        self.dataset = dataset
        self.rng = np.random.default_rng(seed)
        self.augment = augment
        self.click_centred = click_centred
        self.paste_probability = paste_probability
        self._clicks: dict[int, np.ndarray] = {}
        self.categories = sorted(dataset.instances_by_category)
        self.masked_by_category = {
            cat: masked
            for cat, members in dataset.instances_by_category.items()
            if (masked := [inst for inst in members if inst.has_mask])
        }
        self.mask_categories = sorted(self.masked_by_category)
        self.evaluated = dataset.masked_instances(EVALUATED_AREA) if mask_sampling == "instance" else None

    def _random_instance(self) -> Instance:
        cat = self.categories[self.rng.integers(len(self.categories))]
        members = self.dataset.instances_by_category[cat]
        return members[self.rng.integers(len(members))]

    def _random_masked_instance(self) -> Instance:
        """A uniformly drawn category among those with a mask, then one of its instances that has a mask;
        with instance sampling, one of the instances with a mask of at least 32x32 px."""
        if self.evaluated is not None:
            return self.evaluated[self.rng.integers(len(self.evaluated))]
        if not self.mask_categories:
            raise ValueError(f"no instance of {self.dataset.root} has a mask (box-only annotations)")
        cat = self.mask_categories[self.rng.integers(len(self.mask_categories))]
        members = self.masked_by_category[cat]
        return members[self.rng.integers(len(members))]

    def _jittered(
        self, inst: Instance, octaves: float, centre: tuple[float, float] | None = None
    ) -> tuple[tuple[float, float], float]:
        """A window at ``octaves`` from the canonical scale, around ``centre`` (default: the box centre)
        shifted by up to ``SHIFT`` window pixels."""
        scale = OBJECT / inst.size * 2.0**octaves
        dx, dy = self.rng.uniform(-SHIFT, SHIFT, size=2)
        cx, cy = inst.centre if centre is None else centre
        return (cx - dx / scale, cy - dy / scale), scale

    def _click(self, inst: Instance) -> tuple[float, float]:
        """An annotator's click ``(x, y)`` in image pixels: the deepest point or a random interior one."""
        if inst.annotation_id not in self._clicks:
            self._clicks[inst.annotation_id] = annotator_clicks(
                self.dataset.mask(inst), CLICKS_PER_INSTANCE, self.rng
            )
        clicks = self._clicks[inst.annotation_id]
        k = 0 if self.rng.random() < 0.5 else int(self.rng.integers(1, len(clicks)))
        return float(clicks[k, 0]), float(clicks[k, 1])

    def _input(self, image_index: int, centre: tuple[float, float], scale: float, flip: bool) -> np.ndarray:
        return crop_window(self.dataset.pyramid(image_index), centre, scale, flip)

    def _batch_inputs(self, crops: list[np.ndarray]) -> torch.Tensor:
        batch = to_tensor(crops)
        return photometric_jitter(batch, self.rng) if self.augment else batch

    def mask_sample(self) -> tuple[np.ndarray, np.ndarray]:
        """``(192, 192, 3) uint8`` input and ``(160, 160) float32`` target."""
        inst = self._random_masked_instance()
        # No draw when the share is 0: the papers' sampling keeps its random stream (and its models).
        click = self._click(inst) if self.click_centred and self.rng.random() < self.click_centred else None
        centre, scale = self._jittered(inst, self.rng.uniform(-SCALE_JITTER, SCALE_JITTER), click)
        flip = bool(self.rng.integers(2)) if self.augment else False
        target = crop_mask(self.dataset.mask_u8(inst), centre, scale, flip)
        image = self._input(inst.image_index, centre, scale, flip)
        # No draw when the chance is 0, as above.
        if self.paste_probability and self.rng.random() < self.paste_probability:
            self._paste(image, target, inst)
        return image, target

    def _paste(self, image: np.ndarray, target: np.ndarray, inst: Instance) -> None:
        """Paste another instance with a mask over ``image (INPUT, INPUT, 3)`` in place, its larger side
        0.2-0.6 of the window's, its centre anywhere in it; the pixels it covers leave ``target (WINDOW,
        WINDOW)``. Nothing is pasted when it would hide more than half of the target or is ``inst``."""
        other = self._random_masked_instance()
        scale = self.rng.uniform(0.2, 0.6) * INPUT / other.size
        place = self.rng.uniform(0, INPUT, size=2) - INPUT / 2
        if other is inst:
            return
        centre = (other.centre[0] - place[0] / scale, other.centre[1] - place[1] / scale)
        covers = crop_mask(self.dataset.mask_u8(other), centre, scale, False, INPUT) > 0
        hidden = covers[CONTEXT : CONTEXT + WINDOW, CONTEXT : CONTEXT + WINDOW]
        if target[hidden].sum() > target.sum() / 2:
            return
        patch = self._input(other.image_index, centre, scale, False)
        image[covers] = patch[covers]
        target[hidden] = 0.0

    def is_positive_window(self, image_index: int, centre: tuple[float, float], scale: float) -> bool:
        """Whether any instance is centred (within 48 px) at a scale within an octave of canonical."""
        for inst in self.dataset.instances_by_image[image_index]:
            offset = scale * math.dist(inst.centre, centre)
            octaves = abs(math.log2(scale * inst.size / OBJECT))
            if offset < NEG_MIN_OFFSET and octaves < NEG_SCALE_OCTAVES[0]:
                return True
        return False

    def _negative_window(self) -> tuple[int, tuple[float, float], float]:
        while True:
            if self.rng.random() < 0.5:
                inst = self._random_instance()
                sign = 1.0 if self.rng.random() < 0.5 else -1.0
                centre, scale = self._jittered(inst, sign * self.rng.uniform(*NEG_SCALE_OCTAVES))
                image_index = inst.image_index
            else:
                image_index = int(self.rng.integers(len(self.dataset)))
                h, w = self.dataset.image(image_index).shape[:2]
                centre = (self.rng.uniform(0, w), self.rng.uniform(0, h))
                scale = 2.0 ** self.rng.uniform(*RANDOM_NEG_SCALES)
            if not self.is_positive_window(image_index, centre, scale):
                return image_index, centre, scale

    def score_sample(self) -> tuple[np.ndarray, float]:
        """``(192, 192, 3) uint8`` input and label 1.0 (object) or 0.0 (no object)."""
        flip = bool(self.rng.integers(2)) if self.augment else False
        if self.rng.random() < 0.5:
            inst = self._random_instance()
            centre, scale = self._jittered(inst, self.rng.uniform(-SCALE_JITTER, SCALE_JITTER))
            return self._input(inst.image_index, centre, scale, flip), 1.0
        image_index, centre, scale = self._negative_window()
        return self._input(image_index, centre, scale, flip), 0.0

    def mask_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, 3, 192, 192)`` inputs and ``(n, 160, 160)`` targets."""
        inputs, targets = zip(*(self.mask_sample() for _ in range(n)), strict=True)
        return self._batch_inputs(list(inputs)), torch.from_numpy(np.stack(targets))

    def score_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, 3, 192, 192)`` inputs and ``(n,)`` labels in {0, 1}."""
        inputs, labels = zip(*(self.score_sample() for _ in range(n)), strict=True)
        return self._batch_inputs(list(inputs)), torch.tensor(labels, dtype=torch.float32)
