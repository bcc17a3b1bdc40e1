"""Bounded work per request (issue 13 items 5, 6 and 8): a bounded working resolution with results in the
original image's coordinates, a feature cache bounded in bytes, and no download or decode under the model
lock in embedded mode. Real model, real image files read as Label Studio local files."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import decode_rle
from ls_bodies import interior_point
from PIL import Image

from backend.cvat.runtime import Segmenter
from backend.cvat.shapes import nuclio_interaction_result
from backend.feature_cache import FeatureCache
from backend.images import ImageFetcher, content_key
from backend.ls_geometry import percent_to_points
from backend.model_lock import ModelLock
from backend.runtime import Runtime
from backend.settings import Settings
from backend.working_size import WorkingFeatures, working_image, working_shape
from segmodels.geometry import mask_iou, polygon_to_mask
from segmodels.predictor import ImageFeatures

WORK_SIDE = 640  # small enough for fast tests; the bounds do not depend on the value
ENLARGE = 5  # the large image: the COCO image with every pixel a 5x5 block, so its working image is the same
HUGE = 7000  # the single-colour PNG


@pytest.fixture(scope="module")
def files(coco128: Path, tmp_path_factory) -> Path:
    """Local files: ``small.png`` (COCO 42, 640x478, one large dog), ``large.png`` (the same, 3200x2390),
    ``huge.png`` (single colour, 7000x7000) and ``slow.png`` (COCO 9, 640x480)."""
    root = tmp_path_factory.mktemp("local-files")
    small = np.asarray(Image.open(coco128 / "images" / "000000000042.jpg").convert("RGB"))
    Image.fromarray(small).save(root / "small.png")
    Image.fromarray(small.repeat(ENLARGE, axis=0).repeat(ENLARGE, axis=1)).save(root / "large.png")
    Image.new("RGB", (HUGE, HUGE), (90, 140, 200)).save(root / "huge.png")
    Image.open(coco128 / "images" / "000000000009.jpg").convert("RGB").save(root / "slow.png")
    return root


@pytest.fixture(scope="module")
def settings(files: Path) -> Settings:
    return Settings.from_env({}, device="cpu", local_files_root=str(files), max_work_side=WORK_SIDE)


@pytest.fixture(scope="module")
def runtime(settings: Settings) -> Runtime:
    return Runtime(settings)


@pytest.fixture(scope="module")
def dog(coco128: Path) -> list[tuple[float, float]]:
    """A click (x%, y%) deep inside the dog of COCO image 42."""
    x, y, _ = interior_point(coco128, 42, "dog")
    return [(x, y)]


def _click(name: str, points: list[tuple[float, float]], output: str = "polygon") -> dict:
    """A segment job on local file ``name``: positive clicks at ``points`` (x%, y%)."""
    return {
        "image": {"url": f"/data/local-files/?d={name}", "project": "1"},
        "prompt": {"points": [list(p) for p in points], "positive": [True] * len(points)},
        "output": output,
    }


def _cached(runtime: Runtime, files: Path, name: str) -> WorkingFeatures:
    """The feature cache's entry of local file ``name`` (which must be cached)."""
    key = content_key((files / name).read_bytes())
    assert key in runtime.features
    return runtime.features.get(key, lambda: pytest.fail(f"{name} is not cached"))[0]


# ---- working size ------------------------------------------------------------------------------------------
def test_the_working_size_bounds_the_longest_side_and_keeps_the_aspect():
    assert working_shape(640, 478, 1280) == (640, 478)
    assert working_shape(4000, 3000, 1280) == (1280, 960)
    assert working_shape(3000, 4000, 1280) == (960, 1280)
    assert working_shape(20000, 3, 1000) == (1000, 1)
    image = np.zeros((478, 640, 3), np.uint8)
    assert working_image(image, 640) is image


def test_a_working_mask_scales_back_to_the_original_pixels_centre_aligned():
    scaled = WorkingFeatures(ImageFeatures(np.zeros((3, 4, 3), np.uint8)), width=8, height=6)
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = True
    big = scaled.mask_to_original(mask)
    assert big.shape == (6, 8) and big.dtype == bool
    assert np.array_equal(big, mask.repeat(2, axis=0).repeat(2, axis=1))
    assert np.allclose(scaled.points_to_working([[5.0, 3.0]]), [[2.5, 1.5]])
    assert np.allclose(scaled.box_to_working([2, 2, 8, 6]), [1, 1, 4, 3])


def test_a_mask_scales_back_exactly_at_any_ratio():
    """4000x3000 -> 1024x768: original pixel i takes working pixel floor((i + 0.5) * 1024 / 4000)."""
    scaled = WorkingFeatures(ImageFeatures(np.zeros((768, 1024, 3), np.uint8)), width=4000, height=3000)
    mask = np.random.default_rng(0).random((768, 1024)) > 0.5
    mask[:5], mask[-5:] = False, False  # a tight box smaller than the image
    rows, cols = np.arange(3000), np.arange(4000)
    expected = mask[np.ix_((2 * rows + 1) * 768 // 6000, (2 * cols + 1) * 1024 // 8000)]
    assert np.array_equal(scaled.mask_to_original(mask), expected)


# ---- Label Studio jobs ------------------------------------------------------------------------------------
def test_a_click_on_a_7000_px_single_colour_png_works_at_the_working_size(runtime, files):
    result = runtime.segment(_click("huge.png", [(50.0, 50.0)]))
    assert "error" not in result
    assert (result["width"], result["height"]) == (HUGE, HUGE)
    features = _cached(runtime, files, "huge.png").features
    assert (features.width, features.height) == (WORK_SIDE, WORK_SIDE)


def test_the_polygon_of_a_large_image_is_the_one_at_working_size(runtime, files, dog):
    small = runtime.segment(_click("small.png", dog))
    large = runtime.segment(_click("large.png", dog))
    assert (small["width"], small["height"]) == (640, 478)
    assert (large["width"], large["height"]) == (640 * ENLARGE, 478 * ENLARGE)
    assert _cached(runtime, files, "large.png").features.image.shape == (478, 640, 3)
    [small_obj], [large_obj] = small["objects"], large["objects"]
    assert len(small_obj["polygon"]) >= 3
    # The same working pixels, so the same polygon in percent (to its 0.001% rounding).
    np.testing.assert_allclose(large_obj["polygon"], small_obj["polygon"], atol=1e-3)
    region = polygon_to_mask(percent_to_points(np.array(large_obj["polygon"]), 640, 478), 478, 640)
    assert 0.05 < region.mean() < 0.9


def test_the_brush_of_a_downscaled_image_has_the_original_pixels(runtime, dog):
    small = runtime.segment(_click("small.png", dog, "brush"))
    large = runtime.segment(_click("large.png", dog, "brush"))
    [small_obj], [large_obj] = small["objects"], large["objects"]
    width, height = large["width"], large["height"]
    pixels = decode_rle(large_obj["rle"])
    assert pixels.size == width * height * 4
    large_mask = pixels.reshape(height, width, 4)[:, :, 3] > 0
    small_mask = decode_rle(small_obj["rle"]).reshape(478, 640, 4)[:, :, 3] > 0
    assert small_mask.any()
    assert np.array_equal(large_mask, small_mask.repeat(ENLARGE, axis=0).repeat(ENLARGE, axis=1))


def test_the_feature_cache_budget_is_in_megabytes(files, dog):
    settings = Settings.from_env({"SEGMASK_FEATURE_CACHE_MB": "3", "SEGMASK_MAX_WORK_SIDE": "900"})
    assert (settings.feature_cache_mb, settings.max_work_side) == (3, 900)
    runtime = Runtime(Settings.from_env({}, device="cpu", local_files_root=str(files), feature_cache_mb=3))
    assert runtime.features.capacity_bytes == 3 * 2**20
    result = runtime.segment(_click("small.png", dog))
    assert result["objects"] and len(runtime.features) == 0  # ~50 MB of features: used, not kept


# ---- model slots: requests served at once ------------------------------------------------------------


class PeakLock(ModelLock):
    """A model lock recording the most holds it had at once."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.peak = 0

    @contextlib.contextmanager
    def hold(self, key: str | None) -> Iterator[None]:
        with super().hold(key):
            self.peak = max(self.peak, self.holding)
            yield


def test_clicks_on_two_images_served_at_once_get_the_masks_they_get_one_at_a_time(
    settings, files, coco128, dog
):
    bowl = interior_point(coco128, 9, "bowl")[:2]
    sequences = {  # an annotator's first click, then a second positive one, on each image
        "small.png": [dog, [*dog, (dog[0][0] + 5, dog[0][1] + 5)]],
        "slow.png": [[bowl], [bowl, (bowl[0] + 5, bowl[1] - 5)]],
    }
    one = Runtime(settings)  # fresh, as the other: a first click runs the trunk on a block of each level
    alone = {
        name: [one.segment(_click(name, pts))["objects"] for pts in seq] for name, seq in sequences.items()
    }
    shared = Runtime(settings, slots=2)
    shared.lock = PeakLock(2)
    together: dict[str, list] = {}

    def annotate(name: str) -> None:
        together[name] = [shared.segment(_click(name, pts))["objects"] for pts in sequences[name]]

    threads = [threading.Thread(target=annotate, args=(name,)) for name in sequences]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert together == alone
    assert shared.lock.peak == 2
    for done in (one, shared):  # let the background completions end before the runtimes go
        deadline = time.monotonic() + 60
        while not all(
            level.complete for name in sequences for level in _cached(done, files, name).features.levels
        ):
            assert time.monotonic() < deadline, "the background completion did not finish"
            time.sleep(0.05)


class ThreadsLock(ModelLock):
    """A model lock recording PyTorch's thread count at the end of every hold (the runtime sets it inside)."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.threads: list[int] = []

    @contextlib.contextmanager
    def hold(self, key: str | None) -> Iterator[None]:
        with super().hold(key):
            yield
            self.threads.append(torch.get_num_threads())


def test_a_request_alone_runs_on_every_thread_of_the_slots_and_one_beside_others_on_its_own(settings, dog):
    before = torch.get_num_threads()
    runtime = Runtime(settings, slots=2, threads=1)
    runtime.lock = ThreadsLock(2)
    try:
        runtime.detect({"image": {"url": "/data/local-files/?d=small.png", "project": "1"}})
        assert set(runtime.lock.threads) == {2}  # alone: a lone user's pre-annotation is not slower
        runtime.lock.threads.clear()
        with runtime.lock.hold("another image"):
            runtime.segment(_click("small.png", [(dog[0][0] + 1, dog[0][1])]))
        assert set(runtime.lock.threads) == {1}
    finally:
        torch.set_num_threads(before)


# ---- embedded mode: the model lock ------------------------------------------------------------------------
@dataclass
class GatedFetcher:
    """An ImageFetcher whose downloads of ``slow.png`` wait for ``gate``; records whether ``lock`` was held
    during each decode."""

    inner: ImageFetcher
    gate: threading.Event
    lock: threading.Lock | None = None

    def __post_init__(self) -> None:
        self.slow_started = threading.Event()
        self.decoded_under_lock: list[bool] = []

    def fetch(self, url: str, *args, **kwargs) -> bytes:
        if url.endswith("slow.png"):
            self.slow_started.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return self.inner.fetch(url, *args, **kwargs)

    def decode(self, data: bytes) -> np.ndarray:
        self.decoded_under_lock.append(self.lock is not None and self.lock.locked())
        return self.inner.decode(data)


def test_a_slow_download_does_not_hold_the_model_lock(settings, files, dog):
    gate = threading.Event()
    fetcher = GatedFetcher(ImageFetcher(settings), gate)
    runtime = Runtime(settings, fetcher=fetcher)
    fetcher.lock = runtime.lock
    assert runtime.segment(_click("small.png", dog))["objects"]  # cached from now on
    deadline = time.monotonic() + 60
    while not all(level.complete for level in _cached(runtime, files, "small.png").features.levels):
        assert time.monotonic() < deadline, "the background completion of small.png did not finish"
        time.sleep(0.05)

    slow: dict = {}
    thread = threading.Thread(target=lambda: slow.update(runtime.segment(_click("slow.png", [(50, 50)]))))
    thread.start()
    try:
        assert fetcher.slow_started.wait(30)
        assert not runtime.lock.locked()
        cached = runtime.segment(_click("small.png", dog))  # completes while slow.png is still downloading
        assert cached["objects"] and thread.is_alive()
    finally:
        gate.set()
        thread.join(60)
    assert (slow["width"], slow["height"]) == (640, 480)
    assert fetcher.decoded_under_lock == [False, False]  # small.png, then slow.png: never under the lock


# ---- CVAT --------------------------------------------------------------------------------------------------
def test_cvat_prompts_and_masks_are_in_original_pixels(settings, files, dog):
    segmenter = Segmenter(settings)
    small = np.asarray(Image.open(files / "small.png"))
    large = np.asarray(Image.open(files / "large.png"))
    click = [dog[0][0] * 6.4, dog[0][1] * 4.78]
    expected = segmenter.segment(small, [click])
    mask = segmenter.segment(large, [[v * ENLARGE for v in click]])
    assert mask.shape == large.shape[:2] and expected.any()
    assert np.array_equal(mask, expected.repeat(ENLARGE, axis=0).repeat(ENLARGE, axis=1))
    boxed = segmenter.segment(large, [], box=[0, 0, 320 * ENLARGE, 478 * ENLARGE])
    assert boxed.shape == large.shape[:2] and not boxed[:, 330 * ENLARGE :].any()


def test_cvat_polygons_are_traced_at_working_size_in_original_pixels(settings, files, dog):
    small = np.asarray(Image.open(files / "small.png"))
    mask = Segmenter(settings).segment(small, [[dog[0][0] * 6.4, dog[0][1] * 4.78]])
    large_mask = mask.repeat(ENLARGE, axis=0).repeat(ENLARGE, axis=1)
    result = nuclio_interaction_result(large_mask)  # traced at 1024 px, not 3200
    x0, y0, x1, y1 = nuclio_interaction_result(mask)["bounds"]  # inclusive
    assert result["bounds"] == [x0 * ENLARGE, y0 * ENLARGE, (x1 + 1) * ENLARGE - 1, (y1 + 1) * ENLARGE - 1]
    height, width = large_mask.shape
    traced = polygon_to_mask(np.array(result["points"]), height, width)
    assert mask_iou(traced, large_mask) > 0.9


# ---- the cache's byte budget ------------------------------------------------------------------------------
@dataclass
class Blob:
    """A fake cache entry of ``nbytes`` bytes (which may grow, as features do)."""

    nbytes: int


def test_the_feature_cache_evicts_least_recently_used_entries_by_bytes():
    cache: FeatureCache[Blob] = FeatureCache(100)
    for key in "abc":
        cache.get(key, lambda: Blob(40))
    assert "a" not in cache and "b" in cache and "c" in cache and cache.nbytes == 80
    cache.get("b", lambda: pytest.fail("b is cached"))  # b is now the most recently used
    cache.get("d", lambda: Blob(30))
    assert "c" not in cache and {"b", "d"} <= {k for k in "abcd" if k in cache}
    assert (cache.hits, cache.misses) == (1, 4)


def test_an_entry_larger_than_the_budget_is_returned_but_not_kept():
    cache: FeatureCache[Blob] = FeatureCache(100)
    cache.get("a", lambda: Blob(60))
    value, hit = cache.get("big", lambda: Blob(101))
    assert value.nbytes == 101 and not hit
    assert "big" not in cache and "a" in cache and cache.nbytes == 60


def test_trimming_after_an_entry_grew_restores_the_budget_at_once():
    cache: FeatureCache[Blob] = FeatureCache(100)
    a, _ = cache.get("a", lambda: Blob(30))
    cache.get("b", lambda: Blob(30))
    a.nbytes = 80  # a prompt ran part of the trunk on it
    cache.trim()
    assert "a" not in cache and "b" in cache and cache.nbytes == 30


def test_peeking_is_neither_a_hit_nor_a_use():
    cache: FeatureCache[Blob] = FeatureCache(100)
    cache.get("a", lambda: Blob(40))
    cache.get("b", lambda: Blob(40))
    assert cache.peek("a").nbytes == 40 and cache.peek("z") is None
    cache.get("c", lambda: Blob(40))  # a stayed the least recently used
    assert "a" not in cache and cache.hits == 0


class CountedBlob:
    """A fake cache entry that counts how often the cache measures it."""

    def __init__(self, size: int) -> None:
        self.size, self.measured = size, 0

    @property
    def nbytes(self) -> int:
        self.measured += 1
        return self.size


def test_only_entries_handed_out_since_the_last_trim_are_measured_again():
    cache: FeatureCache[CountedBlob] = FeatureCache(1000)
    a, _ = cache.get("a", lambda: CountedBlob(30))
    cache.trim()
    before = a.measured
    for _ in range(5):
        cache.get("b", lambda: CountedBlob(30))
        cache.trim()
    assert a.measured == before  # a busy server's 50 cached images are not walked on every request


def test_a_trim_of_one_image_measures_that_image_alone():
    """Requests served at once each trim the image they changed: another request's image, which may be
    changing meanwhile, is not measured."""
    cache: FeatureCache[CountedBlob] = FeatureCache(1000)
    a, _ = cache.get("a", lambda: CountedBlob(30))
    b, _ = cache.get("b", lambda: CountedBlob(30))
    before = b.measured
    a.size = 50
    cache.trim("a")
    assert b.measured == before and cache.nbytes == 80


def test_a_peeked_entry_that_grew_is_measured_at_the_next_trim():
    cache: FeatureCache[Blob] = FeatureCache(100)
    cache.get("a", lambda: Blob(30))
    cache.get("b", lambda: Blob(30))
    cache.trim()
    cache.peek("a").nbytes = 80  # the background thread completed a level of a's features
    cache.trim()
    assert "a" not in cache and "b" in cache and cache.nbytes == 30
