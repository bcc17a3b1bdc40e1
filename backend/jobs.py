"""The work a worker does: segment one prompt, pre-annotate one image. The same code runs in an RQ worker
process and, in embedded mode, inside the server.

Requests and results are plain JSON (RQ's JSON serializer; nothing is unpickled from Redis):

- image: ``{"url", "project"}``: the task's image URL and the Label Studio project id. No credential travels
  in a job: the worker finds Label Studio and the credential for it with ``backend.access`` (its own
  settings, and the project's /setup information in Redis);
- segment request: ``{"image", "prompt": {"points": [[x%, y%]], "positive": [bool], "box": [x1%, y1%, x2%,
  y2%] | null}, "output": "polygon" | "brush"}``;
- detect request: ``{"image", "output", "score_threshold", "max_detections", "classes"?: [str],
  "uncertainty"?: bool}`` (``classes``: the model classes the project has a label for, so that the cap on
  detections counts those alone; with ``uncertainty``, the result also has ``"uncertainty"`` and
  ``"confidence"`` in [0, 1]);
- result: ``{"model_version", "width", "height", "objects": [{"score", "label"?, "polygon": [[x%, y%]] |
  "rle": [int]}], "seconds": {"image" (fetch), "features" (decode and trunk, when not cached), "model",
  "encode"}}``, or ``{"error": {"status", "kind", "message"}}`` for a problem the client must see (a
  ServiceError raised while serving).

Percent coordinates are converted to pixels here, with the decoded image's own size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from label_studio_sdk.converter.brush import mask2rle
from rq import get_current_job
from rq.utils import now as utcnow

from backend.access import LabelStudioAccess
from backend.errors import ServiceError, bad_request
from backend.images import ImageFetcher, content_key
from backend.settings import Settings
from backend.versions import open_store
from segmodels.geometry import mask_to_polygon, points_to_percent
from segmodels.predictor import ImageFeatures, MaskPredictor, load_predictor
from segmodels.train import resolve_device
from segmodels.uncertainty import detect_with_uncertainty

log = logging.getLogger(__name__)


class FeatureCache:
    """LRU of per-image trunk features keyed by the image's content hash (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(int(capacity), 0)
        self._items: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, compute: Callable[[], ImageFeatures]) -> tuple[ImageFeatures, bool]:
        """The cached features of ``key`` (and True), or ``compute()``'s, cached (and False)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key], True
            self.misses += 1
        features = compute()
        with self._lock:
            self._items[key] = features
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return features, False


class Runtime:
    """What a worker process keeps warm: the predictor, the image fetcher and the feature cache, and how to
    reach Label Studio (``access``; by default from the settings and Redis's /setup registry).

    One predictor serves one request at a time (it holds the current image's features); ``lock``
    serialises requests when several threads share a runtime (embedded mode).
    """

    def __init__(
        self, settings: Settings, fetcher: ImageFetcher | None = None, access: LabelStudioAccess | None = None
    ) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.fetcher = fetcher or ImageFetcher(settings)
        self.access = access or LabelStudioAccess.from_settings(settings)
        self.lock = threading.Lock()
        self.store = open_store(settings)
        self.model_version = ""
        self._load_current()

    def _load_current(self) -> None:
        """Serve the store's current version, loading it if it is not the one loaded (no restart needed)."""
        version = self.store.current_version()
        if version == self.model_version:
            return
        started = time.perf_counter()
        path = self.store.current_dir()
        self.predictor: MaskPredictor = load_predictor(path, self.device)
        self.features = FeatureCache(self.settings.feature_cache_images)
        self.model_version = version
        log.info(
            "model %s loaded from %s on %s in %.1f s",
            version,
            path,
            self.device,
            time.perf_counter() - started,
        )

    def segment(self, request: dict) -> dict:
        """One object for a click/box prompt (see the module docstring for shapes)."""
        prompt = request.get("prompt") or {}
        with self.lock:
            (height, width), seconds = self._set_image(request)
            points, positive, box = _prompt_pixels(prompt, width, height)
            started = time.perf_counter()
            with torch.inference_mode():
                mask = self.predictor.segment(points, positive.astype(int), box).mask
            seconds["model"] = time.perf_counter() - started
        obj = _encode(
            mask, _prompt_score(mask, points, positive), request.get("output"), width, height, seconds
        )
        return self._result(width, height, [obj] if obj else [], seconds)

    def detect(self, request: dict) -> dict:
        """Labelled objects of one image (pre-annotation)."""
        settings = self.settings
        threshold = float(request.get("score_threshold", settings.score_threshold))
        limit = int(request.get("max_detections", settings.max_detections))
        classes = _classes(request.get("classes"))
        with self.lock:
            (height, width), seconds = self._set_image(request)
            started = time.perf_counter()
            with torch.inference_mode():
                if request.get("uncertainty"):
                    detections, measure = detect_with_uncertainty(
                        self.predictor, threshold, limit, classes=classes
                    )
                else:
                    detections = self.predictor.detect(threshold, limit, classes=classes)
                    measure = {}
            seconds["model"] = time.perf_counter() - started
        objects = []
        for det in detections:
            obj = _encode(det.mask, det.score, request.get("output"), width, height, seconds)
            if obj:
                objects.append({**obj, "label": det.label})
        result = self._result(width, height, objects, seconds)
        if measure:
            result.update(uncertainty=float(measure["uncertainty"]), confidence=float(measure["confidence"]))
        return result

    def _set_image(self, request: dict) -> tuple[tuple[int, int], dict]:
        """Fetch the request's image and set its features on the predictor (decoded and computed only when
        not cached); its ``(height, width)`` and the seconds spent fetching and on features."""
        self._load_current()
        ref = request.get("image") or {}
        if not isinstance(ref.get("url"), str):
            raise bad_request("the job names no image URL", "missing_image")
        started = time.perf_counter()
        project = ref.get("project")
        access = self.access.for_project(project if isinstance(project, str) else "")
        data = self.fetcher.fetch(ref["url"], access.url, access.authorization())
        fetched = time.perf_counter()
        with torch.inference_mode():
            features, _ = self.features.get(
                content_key(data), lambda: self.predictor.compute_features(self.fetcher.decode(data))
            )
        self.predictor.set_features(features)
        seconds = {"image": fetched - started, "features": time.perf_counter() - fetched}
        return (features.height, features.width), seconds

    def _result(self, width: int, height: int, objects: list[dict], seconds: dict) -> dict:
        return {
            "model_version": self.model_version,
            "width": width,
            "height": height,
            "objects": objects,
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
        }


def _classes(value: object) -> list[str] | None:
    """A detect request's ``classes``: None (every class) or a list of class names."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise bad_request(f"classes must be a list of class names, got {value!r:.80}")
    return value


def _prompt_pixels(prompt: dict, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Percent prompt -> ``points (N, 2)`` pixel (x, y), ``positive (N,)`` bool, ``box`` xyxy pixels/None."""
    points = np.asarray(prompt.get("points") or [], dtype=np.float64).reshape(-1, 2)
    positive = np.asarray(prompt.get("positive") or [True] * len(points), dtype=bool).reshape(-1)
    if len(positive) != len(points):
        raise bad_request(f"{len(points)} points but {len(positive)} positive flags", "bad_context")
    box = prompt.get("box")
    pixel_box = None
    if box is not None:
        pixel_box = (
            np.asarray(box, dtype=np.float64).reshape(4) * np.array([width, height, width, height]) / 100
        )
    if not positive.any() and pixel_box is None:
        raise bad_request(
            "the prompt needs a positive point or a rectangle (only negative points were sent)", "bad_context"
        )
    return points * np.array([width, height]) / 100.0, positive, pixel_box


def _prompt_score(mask: np.ndarray, points: np.ndarray, positive: np.ndarray) -> float:
    """Share of the prompt's points the mask agrees with (1.0 for a box alone): a plain, honest score."""
    if not len(points):
        return 1.0 if mask.any() else 0.0
    h, w = mask.shape
    xs = np.clip(points[:, 0].astype(int), 0, w - 1)
    ys = np.clip(points[:, 1].astype(int), 0, h - 1)
    return float(np.mean(mask[ys, xs] == positive))


def _encode(
    mask: np.ndarray, score: float, output: str | None, width: int, height: int, seconds: dict
) -> dict:
    """``{"score", "polygon": [[x%, y%]]}`` or ``{"score", "rle"}`` (Label Studio brush RLE); {} if empty."""
    started = time.perf_counter()
    try:
        if not mask.any():
            return {}
        if output == "brush":
            return {"score": float(score), "rle": brush_rle(mask)}
        polygon = mask_to_polygon(mask)
        if polygon is None or len(polygon) < 3:
            return {}
        pct = np.clip(points_to_percent(polygon, width, height), 0.0, 100.0)
        return {"score": float(score), "polygon": np.round(pct, 3).tolist()}
    finally:
        seconds["encode"] = seconds.get("encode", 0.0) + time.perf_counter() - started


def brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush RLE (RGBA, alpha 255 inside) of a bool ``(H, W)`` mask."""
    return [int(v) for v in mask2rle(mask.astype(np.uint8) * 255)]


# ---- RQ entry points ---------------------------------------------------------------------------------------
# A worker process holds exactly one warm Runtime; RQ calls these functions by import path.
_runtime: Runtime | None = None


def install_runtime(runtime: Runtime) -> None:
    """Make ``runtime`` the one the job functions of this process use (backend.worker does this at start)."""
    global _runtime
    _runtime = runtime


def current_runtime() -> Runtime:
    if _runtime is None:
        install_runtime(Runtime(Settings.from_env()))
    return _runtime


def run_job(kind: str, request: dict) -> dict:
    """Run ``kind`` ("segment" or "detect") on ``request``; a ServiceError becomes ``{"error": ...}``."""
    runtime = current_runtime()
    try:
        handler = {"segment": runtime.segment, "detect": runtime.detect}[kind]
    except KeyError:
        raise ValueError(f"unknown job kind {kind!r}") from None
    started = time.perf_counter()
    job = get_current_job()
    queued = (utcnow() - job.enqueued_at).total_seconds() if job and job.enqueued_at else 0.0
    try:
        result = handler(request)
    except ServiceError as exc:
        log.warning("%s job refused: %s (%s)", kind, exc.message, exc.kind)
        result = {"error": {"status": exc.status, "kind": exc.kind, "message": exc.message}}
    # Read by the server (backend.queue) for /metrics, so it needs no extra Redis round trip for them.
    result["timing"] = {"queued": queued, "running": time.perf_counter() - started}
    return result


def segment_job(request: dict) -> dict:
    return run_job("segment", request)


def detect_job(request: dict) -> dict:
    return run_job("detect", request)
