"""The queued path: Flask app -> real Redis -> real `segmask worker` process -> back."""

import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import redis
from ls_bodies import interior_point, keypoints, with_image
from rq_worker import (
    REDIS_URL,
    free_port,
    require_redis,
    start_redis_server,
    start_worker,
    stop,
    stored_under,
)
from upload_server import UPLOAD_TOKEN

from backend.app import create_app
from backend.job_protocol import PRIORITIES
from backend.ls_geometry import percent_to_points
from backend.settings import Settings
from backend.worker import build_worker
from segmodels.geometry import polygon_to_mask

DOG_IMAGE = 42


@pytest.fixture(scope="module")
def queued(tmp_path_factory, upload_server, ls_request):
    require_redis()
    prefix = f"segmask-test-{uuid.uuid4().hex[:8]}"
    worker = start_worker(REDIS_URL, prefix, tmp_path_factory.mktemp("worker") / "worker.log")
    app = create_app(Settings.from_env({}, redis_url=REDIS_URL, queue_prefix=prefix))
    client = app.test_client()
    setup = dict(ls_request("setup"), hostname=upload_server.url, access_token=UPLOAD_TOKEN)
    client.post("/setup", json=setup)
    yield client, prefix
    stop(worker)


def test_a_click_is_served_by_the_worker(queued, ls_request, coco128):
    client, _ = queued
    x, y, gt = interior_point(coco128, DOG_IMAGE, "dog")
    answer = client.post(
        "/predict", json=keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(x, y, True)])
    )
    assert answer.status_code == 200, answer.get_json()
    [prediction] = answer.get_json()["results"]
    [region] = prediction["result"]
    mask = polygon_to_mask(percent_to_points(np.array(region["value"]["points"]), 640, 478), 478, 640)
    assert (mask & gt).sum() / (mask | gt).sum() > 0.5
    assert prediction["model_version"] == client.post("/setup", json={}).get_json()["model_version"]


def test_a_batch_is_served_by_the_worker_one_prediction_per_task(queued, ls_request):
    client, _ = queued
    body = with_image(ls_request("predict-batch"), DOG_IMAGE)
    answer = client.post("/predict", json=body)
    assert answer.status_code == 200, answer.get_json()
    assert len(answer.get_json()["results"]) == len(body["tasks"])


def test_a_refusal_on_the_worker_comes_back_as_the_same_4xx(queued, ls_request):
    client, _ = queued
    body = keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(50, 50, True)])
    body["tasks"][0]["data"]["image"] = "file:///etc/passwd"
    answer = client.post("/predict", json=body)
    assert answer.status_code == 400 and answer.get_json()["error"] == "unsupported_url"


@pytest.fixture
def frozen_worker(queued):
    """The module's worker, stopped with SIGSTOP (a hung worker) for the test, then resumed."""
    client, prefix = queued
    from rq import Queue, Worker

    connection = redis.Redis.from_url(REDIS_URL)
    [worker] = Worker.all(connection=connection, queue=Queue(f"{prefix}:interactive", connection=connection))
    os.kill(worker.pid, signal.SIGSTOP)
    yield prefix
    os.kill(worker.pid, signal.SIGCONT)


def test_a_hung_worker_gives_a_503_within_the_timeout_not_a_hang(frozen_worker, ls_request, upload_server):
    settings = Settings.from_env({}, redis_url=REDIS_URL, queue_prefix=frozen_worker, interactive_timeout=2)
    client = create_app(settings).test_client()
    client.post(
        "/setup", json=dict(ls_request("setup"), hostname=upload_server.url, access_token=UPLOAD_TOKEN)
    )
    started = time.perf_counter()
    answer = client.post(
        "/predict", json=keypoints(ls_request("predict-interactive-keypoint"), 9, [(5, 5, True)])
    )
    assert answer.status_code == 503 and answer.get_json()["error"] == "worker_timeout"
    assert time.perf_counter() - started < 5


def test_the_worker_serves_again_after_it_was_hung(queued, ls_request):
    client, _ = queued
    body = keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(60, 30, True)])
    assert client.post("/predict", json=body).status_code == 200


def test_click_and_batch_jobs_in_redis_hold_no_credential(queued, ls_request):
    """The worker looks the /setup token up by project; it stays in the project's setup hash only."""
    client, prefix = queued
    click = keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(60, 30, True)])
    assert client.post("/predict", json=click).status_code == 200
    assert client.post("/predict", json=with_image(ls_request("predict-batch"), DOG_IMAGE)).status_code == 200
    stored = stored_under(redis.Redis.from_url(REDIS_URL), prefix)
    assert sum(key.startswith("rq:job:") for key in stored) >= 3
    holding = [key for key, value in stored.items() if UPLOAD_TOKEN.encode() in value]
    assert f"{prefix}:setup:1" in holding
    assert all(key.startswith(f"{prefix}:setup:") for key in holding)


def test_workers_read_label_studio_url_and_key_from_their_own_settings(tmp_path, ls_request, upload_server):
    """With LABEL_STUDIO_URL/KEY on server and worker, no /setup is needed and Redis holds no key."""
    require_redis()
    prefix = f"segmask-own-{uuid.uuid4().hex[:8]}"
    env = {"LABEL_STUDIO_URL": upload_server.url, "LABEL_STUDIO_API_KEY": UPLOAD_TOKEN}
    worker = start_worker(REDIS_URL, prefix, tmp_path / "worker.log", queues="interactive", **env)
    try:
        settings = Settings.from_env(env, redis_url=REDIS_URL, queue_prefix=prefix)
        body = keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(60, 30, True)])
        answer = create_app(settings).test_client().post("/predict", json=body)
        assert answer.status_code == 200, answer.get_json()
        stored = stored_under(redis.Redis.from_url(REDIS_URL), prefix)
        assert any(key.startswith("rq:job:") for key in stored)
        assert [key for key, value in stored.items() if UPLOAD_TOKEN.encode() in value] == []
    finally:
        stop(worker)


def test_queue_depths_are_in_the_metrics(queued):
    client, prefix = queued
    text = client.get("/metrics").get_data(as_text=True)
    assert 'segmask_queue_depth{queue="interactive"} 0.0' in text
    assert "segmask_redis_up 1.0" in text


def test_without_a_worker_the_server_answers_503_at_once(ls_request):
    require_redis()
    app = create_app(
        Settings.from_env({}, redis_url=REDIS_URL, queue_prefix=f"nobody-{uuid.uuid4().hex[:6]}")
    )
    started = time.perf_counter()
    answer = app.test_client().post(
        "/predict", json=keypoints(ls_request("predict-interactive-keypoint"), 9, [(5, 5, True)])
    )
    assert answer.status_code == 503 and answer.get_json()["error"] == "no_worker"
    assert time.perf_counter() - started < 2


SERVER_WITH_REDIS = """
import sys

import backend.server  # what `segmask serve` imports
from backend.app import create_app
from backend.settings import Settings

client = create_app(Settings.from_env({}, redis_url=sys.argv[1], queue_prefix=sys.argv[2])).test_client()
assert client.get("/health").get_json()["mode"] == "rq"
assert client.get("/metrics").status_code == 200
print("torch" in sys.modules, sorted(name for name in sys.modules if name.startswith("segmodels")))
"""


def test_a_server_with_redis_does_not_load_pytorch():
    """It holds no model: PyTorch would only cost it start-up time and memory in every server process."""
    require_redis()
    prefix = f"segmask-notorch-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-c", SERVER_WITH_REDIS, REDIS_URL, prefix]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    torch_loaded, segmodels_modules = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert torch_loaded == "False", f"the server loaded PyTorch (segmodels modules: {segmodels_modules})"


def test_workers_take_the_shared_queues_in_priority_order():
    worker = build_worker(
        Settings.from_env({}, redis_url=REDIS_URL, queue_prefix="p"), ("training", "interactive", "batch")
    )
    assert [q.name for q in worker.queues] == [f"p:{name}" for name in PRIORITIES]


def test_a_worker_takes_only_the_queues_it_is_given():
    worker = build_worker(Settings.from_env({}, redis_url=REDIS_URL, queue_prefix="p"), ("batch", "training"))
    assert [q.name for q in worker.queues] == ["p:batch", "p:training"]


@pytest.mark.slow
def test_a_redis_outage_gives_503_and_service_resumes_when_redis_is_back(tmp_path, upload_server, ls_request):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis_server(port)
    worker = start_worker(url, "outage", tmp_path / "worker.log")
    try:
        client = create_app(Settings.from_env({}, redis_url=url, queue_prefix="outage")).test_client()
        client.post(
            "/setup", json=dict(ls_request("setup"), hostname=upload_server.url, access_token=UPLOAD_TOKEN)
        )
        body = keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(60, 30, True)])
        assert client.post("/predict", json=body).status_code == 200
        server.kill()
        server.wait()
        answer = client.post("/predict", json=body)
        assert answer.status_code == 503 and answer.get_json()["error"] == "redis_unavailable"
        assert client.get("/health").status_code == 200
        server = start_redis_server(port)
        deadline = time.monotonic() + 60
        while (
            status := client.post("/predict", json=body).status_code
        ) != 200 and time.monotonic() < deadline:
            time.sleep(1)
        assert status == 200
    finally:
        stop(worker)
        server.kill()


def test_setup_information_reaches_every_server_process(queued, ls_request, upload_server):
    """Two app instances (two gunicorn processes) share what Label Studio sent to one of them."""
    _, prefix = queued
    settings = Settings.from_env({}, redis_url=REDIS_URL, queue_prefix=prefix)
    first, second = create_app(settings).test_client(), create_app(settings).test_client()
    first.post(
        "/setup",
        json=dict(ls_request("setup"), project="77.1", hostname=upload_server.url, access_token=UPLOAD_TOKEN),
    )
    body = keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(60, 30, True)])
    body["project"] = "77.1"
    assert second.post("/predict", json=body).status_code == 200


@pytest.mark.slow
def test_a_killed_worker_stops_counting_and_requests_get_no_worker(tmp_path, ls_request, upload_server):
    require_redis()
    prefix = f"segmask-killed-{uuid.uuid4().hex[:8]}"
    worker = start_worker(REDIS_URL, prefix, tmp_path / "worker.log", queues="interactive")
    connection = redis.Redis.from_url(REDIS_URL)
    [key] = [k.decode() for k in connection.smembers(f"rq:workers:{prefix}:interactive")]
    # After its first idle heartbeat the key lives only ~15 s past the last beat.
    deadline = time.monotonic() + 30
    while not 0 < connection.ttl(key) <= 15 and time.monotonic() < deadline:
        time.sleep(0.2)
    worker.kill()
    worker.wait()
    settings = Settings.from_env({}, redis_url=REDIS_URL, queue_prefix=prefix, interactive_timeout=1)
    client = create_app(settings).test_client()
    setup = dict(ls_request("setup"), hostname=upload_server.url, access_token=UPLOAD_TOKEN)
    client.post("/setup", json=setup)
    body = keypoints(ls_request("predict-interactive-keypoint"), 9, [(5, 5, True)])
    errors = []
    deadline = time.monotonic() + 60  # RQ's own TTL would keep the dead worker counted for 480 s
    while time.monotonic() < deadline and "no_worker" not in errors:
        errors.append(client.post("/predict", json=body).get_json()["error"])
    assert errors[-1] == "no_worker"
    assert set(errors) <= {"worker_timeout", "no_worker"}
