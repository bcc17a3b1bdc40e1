"""What every CVAT entry point shares: the predictor (loaded once per process, lazily), the per-image feature
cache, image decoding and the CVAT-side label plan.

Settings come from the backend's environment variables (backend.settings): ``SEGMASK_MODEL_DIR`` (default:
the shipped model), ``SEGMASK_DEVICE`` (auto, cpu, cuda, cuda:N), ``SEGMASK_SCORE_THRESHOLD`` (0.5),
``SEGMASK_MAX_DETECTIONS``, ``SEGMASK_FEATURE_CACHE_MB``, ``SEGMASK_MAX_WORK_SIDE`` and
``SEGMASK_MAX_IMAGE_PIXELS``; plus ``SEGMASK_CVAT_LABELS`` for the cvat-sdk detection function (see
:func:`label_plan`).

Coordinates: images ``(H, W, 3) uint8 RGB``; points ``(x, y)`` pixels; boxes ``[x1, y1, x2, y2]`` pixels with
exclusive right/bottom edges (segmodels.geometry's conventions). Everything passed in and returned is in the
original image's pixels: the model works on the image downscaled to ``SEGMASK_MAX_WORK_SIDE``
(backend.working_size), and :class:`Segmenter` converts prompts to working pixels and masks back.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backend.errors import ServiceError, bad_request
from backend.feature_cache import FeatureCache
from backend.images import ImageFetcher
from backend.label_mapping import class_to_label
from backend.prompt_limits import check_prompt_size
from backend.settings import Settings
from backend.working_size import WorkingFeatures, working_image
from segmodels.checkpoint_files import read_metadata
from segmodels.device import resolve_device
from segmodels.predictor import Detection, MaskPredictor, load_predictor

log = logging.getLogger(__name__)

LABELS_ENV = "SEGMASK_CVAT_LABELS"


def image_key(image: np.ndarray) -> str:
    """Content hash of a decoded image (shape and pixels), the feature cache's key."""
    digest = hashlib.sha1(repr(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


class Segmenter:
    """The predictor plus an LRU of per-image features, bounded in bytes (thread-safe: one request at a time
    does model work)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        started = time.perf_counter()
        device = resolve_device(settings.device)
        self.predictor: MaskPredictor = load_predictor(
            settings.model_dir, device, trunk_engine=settings.trunk_engine
        )
        self.features: FeatureCache[WorkingFeatures] = FeatureCache(settings.feature_cache_mb << 20)
        self.lock = threading.Lock()
        log.info(
            "segmask model loaded from %s on %s in %.1f s",
            settings.model_dir,
            device,
            time.perf_counter() - started,
        )

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    def image_features(self, image: np.ndarray) -> WorkingFeatures:
        """The trunk features of ``image`` (original ``(H, W, 3)``) computed at its working size, from the
        cache when the same pixels were seen recently."""
        height, width = image.shape[:2]

        def compute() -> WorkingFeatures:
            work = working_image(image, self.settings.max_work_side)
            return WorkingFeatures(self.predictor.compute_features(work), width, height)

        key = image_key(image)
        # Under the lock: the cache measures its entries, which a segment() in another thread may be changing.
        with self.lock, torch.inference_mode():
            features, hit = self.features.get(key, compute)
        log.debug("features of a %dx%d image: %s", width, height, "hit" if hit else "miss")
        return features

    def segment(
        self,
        image: np.ndarray | WorkingFeatures,
        pos_points: Sequence[Sequence[float]],
        neg_points: Sequence[Sequence[float]] = (),
        box: Sequence[float] | None = None,
    ) -> np.ndarray:
        """One object's bool ``(H, W)`` mask of the original image from positive/negative ``(x, y)`` pixel
        points and an optional ``box`` ``[x1, y1, x2, y2]`` pixels (exclusive right/bottom), all original
        pixels."""
        check_prompt_size(len(pos_points) + len(neg_points))
        scaled = image if isinstance(image, WorkingFeatures) else self.image_features(image)
        points = scaled.points_to_working(np.asarray([*pos_points, *neg_points], dtype=np.float64))
        labels = np.array([1] * len(pos_points) + [0] * len(neg_points), dtype=int)
        work_box = None if box is None else scaled.box_to_working(np.asarray(box, dtype=np.float64))
        with self.lock, torch.inference_mode():
            self.features.touch(scaled)  # it grows now; it may have been handed out before the last trim
            self.predictor.set_features(scaled.features)
            mask = self.predictor.segment(points, labels, work_box).mask
            self.features.trim()
        return scaled.mask_to_original(mask)

    def detect(self, image: np.ndarray, threshold: float | None = None) -> list[Detection]:
        """Labelled objects scoring at least ``threshold`` (None: ``SEGMASK_SCORE_THRESHOLD``), best first;
        masks and boxes in original pixels."""
        threshold = self.settings.score_threshold if threshold is None else float(threshold)
        scaled = self.image_features(image)
        with self.lock, torch.inference_mode():
            self.features.touch(scaled)
            self.predictor.set_features(scaled.features)
            detections = self.predictor.detect(threshold, self.settings.max_detections)
            self.features.trim()
        return [scaled.detection_to_original(det) for det in detections]


@functools.cache
def shared_segmenter() -> Segmenter:
    """The process's one :class:`Segmenter`, built on first use from the environment."""
    return Segmenter(shared_settings())


def model_classes(model_dir: str | Path) -> list[str]:
    """The checkpoint's class names, read from its metadata (no weights loaded)."""
    return list(read_metadata(model_dir)["config"]["classes"])


@dataclass(frozen=True)
class LabelPlan:
    """The labels a CVAT function declares (spec label id = index in ``names``) and which spec label id
    each lower-cased model class maps to (classes not in ``class_ids`` are dropped)."""

    names: tuple[str, ...]
    class_ids: dict[str, int]

    def label_id(self, model_class: str) -> int | None:
        return self.class_ids.get(model_class.lower())


def parse_labels(text: str) -> list[tuple[str, str | None]]:
    """``"Vehicle=car,truck,bus;Person;Animal=dog,cat"`` -> ``[(name, predicted_values | None), ...]``:
    task labels separated by ``;``, each optionally followed by ``=`` and the model classes it takes."""
    labels = []
    for item in text.split(";"):
        name, _, predicted = item.partition("=")
        if name.strip():
            labels.append((name.strip(), predicted.strip() or None))
    return labels


def label_plan(classes: Sequence[str], labels_text: str = "") -> LabelPlan:
    """Declare the model's classes as they are (ids = class indices) when ``labels_text`` is empty; else the
    task labels it lists (:func:`parse_labels`), model classes mapped onto them by the shared rule
    (backend.label_mapping: ``predicted_values`` first, then case-insensitive names)."""
    if not labels_text.strip():
        return LabelPlan(tuple(classes), {c.lower(): i for i, c in enumerate(classes)})
    labels = parse_labels(labels_text)
    names = tuple(dict.fromkeys(name for name, _ in labels))
    mapping = class_to_label(labels)
    ids = {c.lower(): names.index(mapping[c.lower()]) for c in classes if c.lower() in mapping}
    unmapped = [name for name in names if name not in {names[i] for i in ids.values()}]
    if unmapped:
        log.warning("%s: no model class maps onto %s", LABELS_ENV, ", ".join(unmapped))
    return LabelPlan(names, ids)


def decode_base64_image(data: object, max_base64_chars: int) -> np.ndarray:
    """Decode CVAT's base64 image string to ``(H, W, 3) uint8 RGB``.

    Raises ServiceError: 413 ``image_too_large`` when the string is longer than ``max_base64_chars``, 400
    ``missing_image``/``bad_image`` when it is absent, not base64 or not a readable image, 413
    ``image_too_many_pixels`` above ``SEGMASK_MAX_IMAGE_PIXELS``.
    """
    if not isinstance(data, str) or not data:
        raise bad_request("the request has no 'image' (a base64 string)", "missing_image")
    if len(data) > max_base64_chars:
        raise ServiceError(
            413,
            "image_too_large",
            f"the base64 image is {len(data)} characters, more than the limit of {max_base64_chars} "
            "(SEGMASK_MAX_BASE64_CHARS; nuclio's default body limit is 32 MiB)",
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"'image' is not valid base64 ({exc})", "bad_image") from None
    try:
        return _decoder().decode(raw)
    except ServiceError as exc:
        if exc.status == 415:
            raise bad_request(exc.message, "bad_image") from None
        raise


@functools.cache
def shared_settings() -> Settings:
    """The environment's settings, read once per process."""
    return Settings.from_env()


@functools.cache
def _decoder() -> ImageFetcher:
    """Decodes image bytes under the settings' pixel limit (its fetching side is unused here)."""
    return ImageFetcher(shared_settings())
