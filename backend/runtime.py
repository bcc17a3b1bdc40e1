"""What a process that runs the model keeps warm, and the work it does: segment one prompt, pre-annotate one
image, or only compute an image's features (warm). A ``segmask worker`` runs it for RQ jobs (backend.jobs);
in embedded mode the server runs it itself (backend.embedded_dispatcher).

Requests and results are plain JSON:

- image: ``{"url", "project"}``: the task's image URL and the Label Studio project id. No credential travels
  in a request: the runtime finds Label Studio and the credential for it with ``backend.access`` (its own
  settings, and the project's /setup information);
- segment request: ``{"image", "prompt": {"points": [[x%, y%]], "positive": [bool], "box": [x1%, y1%, x2%,
  y2%] | null}, "output": "polygon" | "brush"}``;
- detect request: ``{"image", "output", "score_threshold", "max_detections", "classes"?: [str],
  "uncertainty"?: bool}`` (``classes``: the model classes the project has a label for, so that the cap on
  detections counts those alone; with ``uncertainty``, the result also has ``"uncertainty"`` and
  ``"confidence"`` in [0, 1]);
- warm request: ``{"image"}``;
- result: ``{"model_version", "width", "height", "objects": [{"score", "label"?, "polygon": [[x%, y%]] |
  "rle": [int]}], "seconds": {"image" (fetch), "features" (decode when not cached, and the trunk of a
  warm-up or detection), "model" (with the trunk where a prompt runs it), "encode"}}``.
  ``width``/``height`` are the original image's (Label Studio compares them with its
  ``original_width``/``original_height``) and brush RLE is at that size. A problem the client must see is
  raised as a ServiceError (backend.job_protocol says how it crosses RQ).

The model works on the image downscaled to ``SEGMASK_MAX_WORK_SIDE`` (backend.working_size): percent
coordinates are converted to pixels with the working image's size, and polygons come back in percent, which
no scaling changes.

Only model work holds ``Runtime.lock``: a request downloads and decodes its image before taking it, so a
slow image delays its own request only. The lock has ``slots`` places (backend.torch_threads sizes them to
the cores: a click's small convolutions keep one core busy, not two), so that many requests run at once,
never two on one image, each on its own view of the loaded model (:class:`LoadedModel`), on one PyTorch
thread beside others and on all of them alone. It serves waiting requests first come, first served,
clicks before pre-annotation (backend.model_lock), and long work holds it in short turns: a detection or
warm-up runs the trunk one pyramid level per hold.

A prompt on an image runs only the part of the trunk it reads (a first click: a block of each pyramid
level, segmodels.predictor.MaskPredictor.cover), so its answer is not delayed by the rest; the runtime then
runs the rest over the whole pyramid in a background thread, one level per hold of ``lock``, which it
takes only when no request waits for it (in the annotator's time between clicks, on a busy model in the
gaps between requests), so the first click on the next object of that image finds it done.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from backend.access import LabelStudioAccess
from backend.errors import bad_request
from backend.feature_cache import FeatureCache
from backend.images import ImageFetcher, content_key
from backend.job_protocol import DETECT, SEGMENT, WARM, JobKind
from backend.ls_geometry import percent_to_points
from backend.mask_encoding import encode_mask
from backend.model_lock import ModelLock
from backend.settings import Settings
from backend.versions import open_store
from backend.working_size import WorkingFeatures, working_image
from segmodels.device import resolve_device
from segmodels.predictor import FEATURE_DTYPES, MaskPredictor, load_predictor
from segmodels.uncertainty import detect_with_uncertainty

log = logging.getLogger(__name__)
# Images a background completion may have queued at once (a key each; see the module docstring).
COMPLETION_QUEUE = 16


@dataclass
class FetchedImage:
    """A request's image file: its content ``key`` (the feature cache's), the seconds spent on it so far,
    and either ``decoded``: ``(pixels (h, w, 3) uint8 at working size, original width, original height)``
    or, when its features were cached at fetch time, the file's bytes ``data`` (for a decode should they be
    evicted before the request gets the model). Not both: a request waiting for the model keeps only the
    smaller."""

    key: str
    seconds: dict[str, float]
    decoded: tuple[np.ndarray, int, int] | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model version: its predictor and the feature cache of its images (features of one version
    never serve another). A hold of the model lock gets a copy of it with a predictor view of its own
    (:meth:`view`)."""

    version: str
    predictor: MaskPredictor
    features: FeatureCache[WorkingFeatures]

    def view(self) -> LoadedModel:
        """The same weights and cache, and a predictor whose current image is this view's alone."""
        return LoadedModel(self.version, copy.copy(self.predictor), self.features)


class Runtime:
    """What a model process keeps warm: the model and its feature cache (:class:`LoadedModel`), the image
    fetcher, and how to reach Label Studio (``access``; by default from the settings and Redis's /setup
    registry).

    ``lock`` lets ``slots`` requests use the model at once when several threads share a runtime (embedded
    mode; a worker's job and its click lane), never two on one image. With ``threads`` (PyTorch threads per
    slot, backend.torch_threads), a request that holds the model alone runs on every thread of the slots
    (a lone user's detection is then not slower), one beside others on ``threads``; ONNX Runtime's trunk
    has them all (its pool serves concurrent runs without more threads). Without, PyTorch's threads are
    left as they are.
    """

    def __init__(
        self,
        settings: Settings,
        fetcher: ImageFetcher | None = None,
        access: LabelStudioAccess | None = None,
        slots: int = 1,
        threads: int | None = None,
    ) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.fetcher = fetcher or ImageFetcher(settings)
        self.access = access or LabelStudioAccess.from_settings(settings)
        self.lock = ModelLock(slots)
        # PyTorch threads of a hold beside others, and of one alone (every slot's); None: left as they are.
        self._threads, self._all_threads = threads, None if threads is None else threads * slots
        # Decodes run one at a time, outside ``lock``: a full-size decode (up to SEGMASK_MAX_IMAGE_PIXELS x 3
        # bytes, before downscaling) per server thread at once could take gigabytes.
        self._decode_lock = threading.Lock()
        self.store = open_store(settings)
        self._reload_lock = threading.Lock()
        self.loaded = self._load(self.store.current_version())
        # Images whose features a prompt left incomplete (bounded: a key each, the oldest dropped first), and
        # the thread completing them, which runs only while there are some.
        self._incomplete: deque[str] = deque(maxlen=COMPLETION_QUEUE)
        self._completion_lock = threading.Lock()
        self._completer: threading.Thread | None = None

    @property
    def model_version(self) -> str:
        """The version loaded now."""
        return self.loaded.version

    @property
    def predictor(self) -> MaskPredictor:
        """The predictor of the version loaded now (each hold of the model uses a view of it)."""
        return self.loaded.predictor

    @property
    def features(self) -> FeatureCache[WorkingFeatures]:
        """The feature cache of the version loaded now."""
        return self.loaded.features

    @contextlib.contextmanager
    def _model(self, key: str, background: bool = False) -> Iterator[LoadedModel]:
        """Hold a place of ``lock`` for work on the image ``key`` (yielding to every request when
        ``background``), with a view of the store's current version (:meth:`_load_current`)."""
        with self.lock.background(key) if background else self.lock.hold(key):
            if self._threads is not None:
                # Per calling thread: PyTorch's OpenMP thread count is each thread's own setting.
                torch.set_num_threads(self._all_threads if self.lock.holding == 1 else self._threads)
            with self._reload_lock:
                self._load_current()
                model = self.loaded.view()
            yield model

    def _load_current(self) -> None:
        """Serve the store's current version, loading it if it is not the one loaded (no restart needed)."""
        version = self.store.current_version()
        if version != self.loaded.version:
            self.loaded = self._load(version)

    def _load(self, version: str) -> LoadedModel:
        """The store's ``version`` (its current one), loaded, with an empty feature cache."""
        started = time.perf_counter()
        path = self.store.current_dir()
        predictor = load_predictor(
            path,
            self.device,
            trunk_engine=self.settings.trunk_engine,
            feature_dtype=FEATURE_DTYPES[self.settings.feature_precision],
            trunk_threads=self._all_threads,
        )
        log.info(
            "model %s loaded from %s on %s in %.1f s",
            version,
            path,
            self.device,
            time.perf_counter() - started,
        )
        return LoadedModel(version, predictor, FeatureCache(self.settings.feature_cache_mb << 20))

    def run(self, kind: JobKind, request: dict) -> dict:
        """The result of the job ``kind`` on ``request``: :meth:`segment`, :meth:`detect` or :meth:`warm`."""
        return {SEGMENT: self.segment, DETECT: self.detect, WARM: self.warm}[kind](request)

    def segment(self, request: dict) -> dict:
        """One object for a click/box prompt (see the module docstring for shapes)."""
        prompt = request.get("prompt") or {}
        image = self._fetch(request)
        seconds = image.seconds
        with self._model(image.key) as model:
            scaled = self._set_features(model, image)
            points, positive, box = _prompt_pixels(prompt, scaled.features.width, scaled.features.height)
            started = time.perf_counter()
            with torch.inference_mode():
                mask = model.predictor.segment(points, positive.astype(int), box).mask
            seconds["model"] = time.perf_counter() - started
            model.features.trim(image.key)
            if not all(level.complete for level in scaled.features.levels):
                self._complete_later(image.key)
        obj = encode_mask(mask, _prompt_score(mask, points, positive), request.get("output"), scaled, seconds)
        return self._result(model.version, scaled, [obj] if obj else [], seconds)

    def warm(self, request: dict) -> dict:
        """Compute and cache the features of the request's image (no objects): Label Studio opened a task
        while pre-annotation is off, and its clicks will follow."""
        image = self._fetch(request)
        version, scaled = self._complete_in_turns(image)
        return self._result(version, scaled, [], image.seconds)

    def detect(self, request: dict) -> dict:
        """Labelled objects of one image (pre-annotation)."""
        settings = self.settings
        threshold = float(request.get("score_threshold", settings.score_threshold))
        limit = int(request.get("max_detections", settings.max_detections))
        classes = _classes(request.get("classes"))
        image = self._fetch(request)
        seconds = image.seconds
        self._complete_in_turns(image)
        with self._model(image.key) as model:
            scaled = self._set_features(model, image)
            started = time.perf_counter()
            with torch.inference_mode():
                if request.get("uncertainty"):
                    detections, measure = detect_with_uncertainty(
                        model.predictor, threshold, limit, classes=classes
                    )
                else:
                    detections = model.predictor.detect(threshold, limit, classes=classes)
                    measure = {}
            seconds["model"] = time.perf_counter() - started
            model.features.trim(image.key)
        objects = []
        for det in detections:
            obj = encode_mask(det.mask, det.score, request.get("output"), scaled, seconds)
            if obj:
                objects.append({**obj, "label": det.label})
        result = self._result(model.version, scaled, objects, seconds)
        if measure:
            result.update(uncertainty=float(measure["uncertainty"]), confidence=float(measure["confidence"]))
        return result

    def _fetch(self, request: dict) -> FetchedImage:
        """Download the request's image and, unless its features are cached, decode it to working size. Runs
        without ``lock``: a slow download or decode delays this request only."""
        ref = request.get("image") or {}
        if not isinstance(ref.get("url"), str):
            raise bad_request("the job names no image URL", "missing_image")
        started = time.perf_counter()
        project = ref.get("project")
        access = self.access.for_project(project if isinstance(project, str) else "")
        data = self.fetcher.fetch(ref["url"], access.url, access.authorization())
        fetched = time.perf_counter()
        key = content_key(data)
        if key in self.features:
            return FetchedImage(key, {"image": fetched - started, "features": 0.0}, data=data)
        decoded = self._decode(data)
        seconds = {"image": fetched - started, "features": time.perf_counter() - fetched}
        return FetchedImage(key, seconds, decoded=decoded)

    def _decode(self, data: bytes) -> tuple[np.ndarray, int, int]:
        """Image file bytes -> ``(pixels (h, w, 3) uint8 at working size, original width, height)``."""
        with self._decode_lock:
            image = self.fetcher.decode(data)
            height, width = image.shape[:2]
            return working_image(image, self.settings.max_work_side), width, height

    def _set_features(self, model: LoadedModel, image: FetchedImage) -> WorkingFeatures:
        """Set ``image``'s features on the hold's predictor, from the cache or made now (the caller holds
        ``model``); adds the seconds spent to ``image.seconds["features"]``. New features have no trunk taps
        yet: each prompt or detection runs the trunk on what it reads (MaskPredictor.compute_features), and
        keeps it."""
        started = time.perf_counter()

        def compute() -> WorkingFeatures:
            # Decoded here only when the features were evicted (or the model changed) since the fetch.
            pixels, width, height = image.decoded or self._decode(image.data)
            return WorkingFeatures(model.predictor.compute_features(pixels, trunk=False), width, height)

        with torch.inference_mode():
            scaled, _ = model.features.get(image.key, compute)
        model.predictor.set_features(scaled.features)
        image.seconds["features"] += time.perf_counter() - started
        return scaled

    def _complete_in_turns(self, image: FetchedImage) -> tuple[str, WorkingFeatures]:
        """Run the trunk over every level of ``image``'s pyramid (a detection reads them all), one level per
        hold of the model, so a click arriving meanwhile waits for one level at most; returns the model
        version and the features. One turn per level at most: features evicted meanwhile are completed by
        the caller's own hold."""
        turns = len(self.predictor.scales)
        while True:
            with self._model(image.key) as model:
                scaled = self._set_features(model, image)
                started = time.perf_counter()
                left = self._complete_next_level(model, image.key, scaled)
                image.seconds["features"] += time.perf_counter() - started
            turns -= 1
            if left <= 1 or turns <= 0:
                return model.version, scaled

    @staticmethod
    def _complete_next_level(model: LoadedModel, key: str, scaled: WorkingFeatures) -> int:
        """Run the trunk over the first level of ``scaled`` (the features of image ``key``) it has not
        covered whole, and trim the cache (the caller holds ``model``); returns how many levels were
        incomplete."""
        left = [level for level in scaled.features.levels if not level.complete]
        if left:
            with torch.inference_mode():
                model.predictor.complete(left[0], scaled.features.image)
            model.features.trim(key)
        return len(left)

    def _complete_later(self, key: str) -> None:
        """Queue the image ``key`` for :meth:`_complete_features`, starting its thread when none runs."""
        with self._completion_lock:
            if key not in self._incomplete:
                self._incomplete.append(key)
            if self._completer is None:
                # A fresh context: nothing of the request (its ModelWait) follows the thread.
                thread = threading.Thread(
                    target=contextvars.Context().run,
                    args=(self._complete_features,),
                    name="segmask-complete-levels",
                    daemon=True,
                )
                try:
                    thread.start()
                except RuntimeError:
                    log.exception("no thread to complete image features in the background")
                    return
                self._completer = thread

    def _complete_features(self) -> None:
        """The background thread: run the trunk over every level of each queued image still cached, one
        level per hold of ``lock``, taken only when no request waits for it (one arriving meanwhile waits
        for one level at most); ends when the queue is empty."""
        while True:
            with self._completion_lock:
                if not self._incomplete:
                    self._completer = None
                    return
                key = self._incomplete.pop()  # the image worked on last first
            try:
                while self._complete_one_level(key):
                    pass
            except Exception:
                log.exception("completing the features of image %s failed", key)

    def _complete_one_level(self, key: str) -> bool:
        """Complete one level of the cached features of ``key`` when no request waits for the model; False
        when there is none left or the image is no longer cached."""
        with self._model(key, background=True) as model:
            scaled = model.features.peek(key)
            return scaled is not None and self._complete_next_level(model, key, scaled) > 0

    @staticmethod
    def _result(version: str, scaled: WorkingFeatures, objects: list[dict], seconds: dict) -> dict:
        """The job result of the model ``version``; ``width``/``height`` are the original image's."""
        return {
            "model_version": version,
            "width": scaled.width,
            "height": scaled.height,
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
        corners = np.asarray(box, dtype=np.float64).reshape(2, 2)  # (x1%, y1%), (x2%, y2%)
        pixel_box = percent_to_points(corners, width, height).reshape(4)
    if not positive.any() and pixel_box is None:
        raise bad_request(
            "the prompt needs a positive point or a rectangle (only negative points were sent)", "bad_context"
        )
    return percent_to_points(points, width, height), positive, pixel_box


def _prompt_score(mask: np.ndarray, points: np.ndarray, positive: np.ndarray) -> float:
    """Share of the prompt's points the mask agrees with (1.0 for a box alone): a plain, honest score."""
    if not len(points):
        return 1.0 if mask.any() else 0.0
    h, w = mask.shape
    xs = np.clip(points[:, 0].astype(int), 0, w - 1)
    ys = np.clip(points[:, 1].astype(int), 0, h - 1)
    return float(np.mean(mask[ys, xs] == positive))
