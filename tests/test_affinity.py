"""Clicks find their image's features: warm on task open, and cache affinity across real RQ workers."""

import contextlib
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from ls_bodies import interior_point, keypoints, with_image
from rq.registry import FinishedJobRegistry
from rq_worker import REDIS_URL, require_redis, start_worker, stop
from upload_server import UPLOAD_TOKEN

from backend.affinity import AffinityMap, image_key, working_key
from backend.app import create_app
from backend.click_lane import alive_key, lane_key
from backend.images import content_key
from backend.model_lock import ModelLock
from backend.settings import Settings

DOG_IMAGE = 42
IMAGE = {"project": "7", "url": "/data/upload/7/dog.jpg"}


def _client(app, upload_server, ls_request):
    client = app.test_client()
    setup = dict(ls_request("setup"), hostname=upload_server.url, access_token=UPLOAD_TOKEN)
    assert client.post("/setup", json=setup).status_code == 200
    return client


def _embedded(settings, upload_server, ls_request):
    """An embedded-mode app set up for the upload server: its test client and its runtime."""
    app = create_app(settings)
    return _client(app, upload_server, ls_request), app.extensions["segmask"]["service"].dispatcher.runtime


def _dog_click(ls_request, coco128) -> dict:
    """Label Studio's keypoint request: one positive click inside the dog of DOG_IMAGE."""
    x, y, _ = interior_point(coco128, DOG_IMAGE, "dog")
    return keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(x, y, True)])


def _cached_levels(runtime, coco128, image_id: int) -> list:
    """The pyramid levels of COCO128 image ``image_id``'s features in the runtime's cache."""
    key = content_key((coco128 / "images" / f"{image_id:012d}.jpg").read_bytes())
    cached = runtime.features.peek(key)
    assert cached is not None, f"image {image_id} is not cached"
    return cached.features.levels


class CountingLock(ModelLock):
    """The runtime's model lock, counting its holds."""

    def __init__(self) -> None:
        super().__init__()
        self.holds = 0

    @contextlib.contextmanager
    def hold(self, key: str | None) -> Iterator[None]:
        with super().hold(key):
            self.holds += 1
            yield


def test_the_image_key_tells_projects_and_urls_apart():
    keys = {
        image_key(IMAGE),
        image_key({**IMAGE, "project": "8"}),
        image_key({**IMAGE, "url": "/data/upload/7/cat.jpg"}),
    }
    assert len(keys) == 3 and image_key(dict(IMAGE)) in keys


def test_with_preannotation_off_opening_a_task_returns_no_objects_and_keeps_its_features(
    upload_server, ls_request, coco128
):
    client, runtime = _embedded(Settings.from_env({}, preannotate=False), upload_server, ls_request)
    body = with_image(ls_request("predict-batch"), DOG_IMAGE)
    body["tasks"] = body["tasks"][:1]  # Label Studio opening one task
    answer = client.post("/predict", json=body)
    assert answer.status_code == 200, answer.get_json()
    [prediction] = answer.get_json()["results"]
    assert prediction["result"] == [] and prediction["model_version"]
    assert all(
        level.complete for level in _cached_levels(runtime, coco128, DOG_IMAGE)
    )  # the trunk ran, whole
    misses = runtime.features.misses
    assert client.post("/predict", json=_dog_click(ls_request, coco128)).status_code == 200
    assert runtime.features.misses == misses  # the click's features were there


def test_after_a_click_on_an_unopened_image_its_features_are_completed_in_the_background(
    upload_server, ls_request, coco128
):
    client, runtime = _embedded(Settings.from_env({}), upload_server, ls_request)
    click = _dog_click(ls_request, coco128)
    assert client.post("/predict", json=click).status_code == 200
    levels = _cached_levels(runtime, coco128, DOG_IMAGE)
    deadline = time.monotonic() + 60
    while not all(level.complete for level in levels):
        assert time.monotonic() < deadline, "the background completion did not finish in 60 s"
        time.sleep(0.05)
    hits = runtime.features.hits
    assert client.post("/predict", json=click).status_code == 200
    assert runtime.features.hits == hits + 1


@pytest.fixture
def affinity():
    connection = require_redis()
    prefix = f"segmask-affinity-{uuid.uuid4().hex[:8]}"
    worker = "segmask-test-worker"
    connection.set(alive_key(prefix, worker), 1)
    yield AffinityMap(connection, prefix, ttl=60), connection, prefix, worker
    for key in connection.scan_iter(f"{prefix}:*"):
        connection.delete(key)


def test_a_click_on_an_image_nobody_worked_on_takes_the_shared_queue(affinity):
    table, _, _, _ = affinity
    assert table.worker_for(IMAGE) is None


def test_a_click_goes_to_the_idle_worker_that_worked_on_its_image(affinity):
    table, _, prefix, worker = affinity
    table.remember(IMAGE, worker)
    assert table.worker_for(IMAGE) == worker
    assert table.worker_for({**IMAGE, "url": "/data/upload/7/other.jpg"}) is None


def test_a_click_waits_for_a_worker_busy_with_another_click(affinity):
    table, connection, prefix, worker = affinity
    table.remember(IMAGE, worker)
    connection.set(working_key(prefix, worker), f"{prefix}:interactive")
    assert table.worker_for(IMAGE) == worker


def test_a_click_does_not_wait_behind_a_batch_or_training_job(affinity):
    table, connection, prefix, worker = affinity
    table.remember(IMAGE, worker)
    for queue in ("batch", "training"):
        connection.set(working_key(prefix, worker), f"{prefix}:{queue}")
        assert table.worker_for(IMAGE) is None


def test_a_click_does_not_queue_behind_another_waiting_for_the_same_worker(affinity):
    table, connection, prefix, worker = affinity
    table.remember(IMAGE, worker)
    connection.rpush(lane_key(prefix, worker), "a waiting click")
    assert table.worker_for(IMAGE) is None


def test_a_click_does_not_go_to_a_worker_whose_lane_is_not_served(affinity):
    table, connection, prefix, worker = affinity
    table.remember(IMAGE, worker)
    connection.delete(alive_key(prefix, worker))
    assert table.worker_for(IMAGE) is None


def test_the_record_expires_after_the_ttl(affinity):
    table, connection, prefix, worker = affinity
    table.remember(IMAGE, worker)
    assert 0 < connection.ttl(f"{prefix}:affinity:{image_key(IMAGE)}") <= 60


@pytest.mark.slow
def test_clicks_after_pre_annotation_go_to_the_worker_that_holds_the_features(
    tmp_path, upload_server, ls_request, coco128
):
    connection: redis.Redis = require_redis()
    prefix = f"segmask-affinity-{uuid.uuid4().hex[:8]}"
    workers = [start_worker(REDIS_URL, prefix, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        app = create_app(Settings.from_env({}, redis_url=REDIS_URL, queue_prefix=prefix))
        client = _client(app, upload_server, ls_request)
        body = with_image(ls_request("predict-batch"), DOG_IMAGE)
        body["tasks"] = body["tasks"][:1]
        assert client.post("/predict", json=body).status_code == 200
        [key] = list(connection.scan_iter(f"{prefix}:affinity:*"))
        holder = connection.get(key).decode()
        x, y, _ = interior_point(coco128, DOG_IMAGE, "dog")
        for dx in range(3):
            click = keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(x + dx, y, True)])
            assert client.post("/predict", json=click).status_code == 200
        # The clicks took the holder's lane (backend.click_lane), not RQ's shared queue.
        assert FinishedJobRegistry(f"{prefix}:interactive", connection=connection).count == 0
        assert connection.get(key).decode() == holder
    finally:
        for worker in workers:
            stop(worker)


def test_a_job_runs_when_its_worker_cannot_record_the_image(monkeypatch, free_redis_url):
    import backend.jobs as jobs

    class Runtime:
        settings = Settings.from_env({}, affinity_ttl=60)

        def run(self, kind, request):
            return {"objects": [], "model_version": "v"}

    unreachable = redis.Redis.from_url(free_redis_url, socket_connect_timeout=0.2)
    job = type("Job", (), {"worker_name": "w", "connection": unreachable, "enqueued_at": None})()
    monkeypatch.setattr(jobs, "get_current_job", lambda: job)
    monkeypatch.setattr(jobs, "_runtime", Runtime())
    assert jobs.segment_job({"image": IMAGE})["objects"] == []


@pytest.fixture
def free_redis_url():
    """A Redis URL nothing listens on."""
    from rq_worker import free_port

    return f"redis://127.0.0.1:{free_port()}/0"


def test_pre_annotation_of_a_new_image_holds_the_model_one_pyramid_level_at_a_time(
    upload_server, ls_request, coco128
):
    client, runtime = _embedded(Settings.from_env({}), upload_server, ls_request)
    runtime.lock = CountingLock()
    body = with_image(ls_request("predict-batch"), DOG_IMAGE)
    body["tasks"] = body["tasks"][:1]
    assert client.post("/predict", json=body).status_code == 200
    levels = _cached_levels(runtime, coco128, DOG_IMAGE)
    assert all(level.complete for level in levels)
    assert runtime.lock.holds == len(levels) + 1  # a turn per level, then the detection
