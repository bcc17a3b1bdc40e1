"""Capacity under load: PyTorch threads sized to the machine, /health and /metrics answered however busy the
model is, latencies that include the wait for a server thread, and metrics summed over server processes.

The server tests run `segmask serve` (real gunicorn) with clicks whose images come from a real HTTP server
that holds every image until the test lets it go, so the requests stay in flight as long as needed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from ls_bodies import keypoints
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from rq_worker import REDIS_URL, require_redis, start_server, stop
from upload_server import UPLOAD_TOKEN

from backend.app import predict_request_limit
from backend.settings import Settings
from backend.torch_threads import ThreadPlan, thread_plan, usable_cores

SERVER_THREADS = 16
MAX_PREDICTS = 10  # more than the 8 threads the server used to have, all of them waiting at once
CLICKS = MAX_PREDICTS + 2
HOLD_S = 1.5


# --- PyTorch threads ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, cores, omp, concurrency, slots, threads",
    [
        ({}, 8, "", None, 8, 1),  # embedded: a request per core, one thread each
        ({}, 8, "", 2, 2, 4),  # a worker runs two at most (its job and its click lane)
        ({"SEGMASK_WORKERS_PER_HOST": "2"}, 8, "", None, 4, 1),
        ({"SEGMASK_WORKERS_PER_HOST": "2"}, 2, "", None, 1, 1),
        ({"SEGMASK_WORKERS_PER_HOST": "3"}, 2, "", None, 1, 1),  # never 0
        (
            {"SEGMASK_WORKERS_PER_HOST": "2"},
            8,
            "2",
            None,
            2,
            2,
        ),  # an OMP_NUM_THREADS set by the deployer stands
        (
            {"SEGMASK_TORCH_THREADS": "3", "SEGMASK_WORKERS_PER_HOST": "2"},
            8,
            "1",
            None,
            1,
            3,
        ),  # explicit wins
        ({"SEGMASK_MODEL_SLOTS": "1"}, 8, "", None, 1, 8),  # one request at a time on every core
        ({"SEGMASK_MODEL_SLOTS": "3"}, 2, "", 2, 3, 1),  # explicit slots win over the cap
    ],
)
def test_model_slots_and_torch_threads_follow_the_settings_and_the_auto_rule(
    env, cores, omp, concurrency, slots, threads
):
    assert thread_plan(Settings.from_env(env), cores, omp, concurrency) == ThreadPlan(slots, threads)


def test_usable_cores_obey_a_cgroup_cpu_quota(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path / "absent") == affinity
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == affinity
    cpu_max.write_text("100000 100000\n")
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text("50000 100000\n")  # half a core still gets a thread
    assert usable_cores(cpu_max) == 1


TORCH_THREADS_CODE = """
import torch
from backend.settings import Settings
from backend.torch_threads import apply_torch_threads
apply_torch_threads(Settings.from_env())
print(torch.get_num_threads(), torch.get_num_interop_threads())
"""


def test_a_model_process_gets_the_threads_chosen():
    """In a fresh process, as PyTorch fixes its inter-op pool once used (the auto rule in a real model
    process: test_the_embedded_server_sizes_its_torch_threads)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"SEGMASK_TORCH_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", TORCH_THREADS_CODE], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "3"]


# --- the /predict bound ------------------------------------------------------------------------------


def test_predict_requests_leave_threads_free_for_health():
    assert predict_request_limit(Settings.from_env({})) == 48
    assert predict_request_limit(Settings.from_env({}, server_threads=2)) == 1
    assert predict_request_limit(Settings.from_env({}, server_threads=16, max_predict_requests=10)) == 10
    for threads, limit in ((16, 16), (1, 0)):
        with pytest.raises(ValueError, match="SEGMASK_MAX_PREDICT_REQUESTS"):
            predict_request_limit(Settings.from_env({}, server_threads=threads, max_predict_requests=limit))


# --- a real server under load ------------------------------------------------------------------------


class HeldImages:
    """Label Studio's upload serving, except that every image waits until :meth:`release`."""

    def __init__(self) -> None:
        ok, jpeg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (120, 160, 3), np.uint8))
        assert ok
        self.released = threading.Event()
        self.asked = threading.Semaphore(0)
        held = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                held.asked.release()
                held.released.wait(30)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(jpeg)))
                self.end_headers()
                self.wfile.write(jpeg.tobytes())

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def held_images():
    images = HeldImages()
    yield images
    images.close()


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory, held_images, ls_request):
    """`segmask serve` in embedded mode: SERVER_THREADS threads, MAX_PREDICTS /predict at once, PyTorch
    threads by the auto rule for two model processes on this machine; its URL and log."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {
        "SEGMASK_SERVER_THREADS": str(SERVER_THREADS),
        "SEGMASK_MAX_PREDICT_REQUESTS": str(MAX_PREDICTS),
        "SEGMASK_WORKERS_PER_HOST": "2",
        "SEGMASK_IMAGE_TIMEOUT": "60",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name in ("OMP_NUM_THREADS", "SEGMASK_TORCH_THREADS", "SEGMASK_REDIS_URL"):
            patch.delenv(name, raising=False)
        proc, url = start_server(env, log)
    try:
        setup = dict(ls_request("setup"), hostname=held_images.url, access_token=UPLOAD_TOKEN)
        assert requests.post(f"{url}/setup", json=setup, timeout=10).ok
        yield url, log
    finally:
        stop(proc)


def _timed_get(url: str) -> tuple[requests.Response, float]:
    started = time.perf_counter()
    answer = requests.get(url, timeout=10)
    return answer, time.perf_counter() - started


def test_the_embedded_server_sizes_its_torch_threads(embedded_server):
    _, log = embedded_server
    plan = thread_plan(Settings.from_env({"SEGMASK_WORKERS_PER_HOST": "2"}), usable_cores())
    threads = f"PyTorch threads: {plan.threads} intra-op, {plan.threads} inter-op"
    assert f"{threads}, for each of {plan.slots} model slots" in log.read_text()


def test_health_and_metrics_answer_at_once_while_clicks_wait_for_the_model(
    embedded_server, held_images, ls_request
):
    url, _ = embedded_server
    answers: list[requests.Response] = []

    def click(k: int) -> None:
        body = keypoints(ls_request("predict-interactive-keypoint"), 1000 + k, [(50, 50, True)])
        answers.append(requests.post(f"{url}/predict", json=body, timeout=60))

    clicks = [threading.Thread(target=click, args=(k,)) for k in range(CLICKS)]
    for thread in clicks:
        thread.start()
    try:
        assert held_images.asked.acquire(timeout=20), "no click reached the image server"
        deadline = time.monotonic() + 10
        while len(answers) < CLICKS - MAX_PREDICTS and time.monotonic() < deadline:
            time.sleep(0.05)
        # The clicks over the bound were refused at once; the others all hold a thread, waiting.
        assert [a.json()["error"] for a in answers] == ["busy"] * (CLICKS - MAX_PREDICTS)
        assert all(a.status_code == 503 for a in answers)
        for path in ("/health", "/metrics") * 3:
            answer, seconds = _timed_get(f"{url}{path}")
            assert answer.ok and seconds < 1.0, (path, seconds)
        metrics = answer.text
        assert "segmask_redis_up" not in metrics  # embedded mode has no Redis to be up
        assert 'segmask_errors_total{kind="busy",route="/predict"} 2.0' in metrics
    finally:
        held_images.release()
        for thread in clicks:
            thread.join(60)
    assert sorted(a.status_code for a in answers) == [200] * MAX_PREDICTS + [503] * (CLICKS - MAX_PREDICTS)


def _histogram(metrics: str, name: str, **labels: str) -> tuple[float, float]:
    """``(sum, count)`` of the histogram ``name`` with ``labels`` in a /metrics text."""
    found = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name in (f"{name}_sum", f"{name}_count") and labels.items() <= sample.labels.items():
                found[sample.name.rsplit("_", 1)[1]] = sample.value
    return found.get("sum", 0.0), found.get("count", 0.0)


def _hold_a_thread(url: str) -> socket.socket:
    """A client that sends /setup's headers and the first byte of its body, then nothing: the server thread
    reading the body waits until the rest comes."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /setup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    sock.sendall(b"Content-Length: 2\r\nConnection: close\r\n\r\n{")
    return sock


def test_latency_includes_the_wait_for_a_server_thread(embedded_server):
    url, _ = embedded_server
    before = requests.get(f"{url}/metrics", timeout=5).text
    holders = [_hold_a_thread(url) for _ in range(SERVER_THREADS)]
    try:
        time.sleep(0.3)  # every thread now reads a body that does not come
        health: list[float] = []
        asker = threading.Thread(target=lambda: health.append(_timed_get(f"{url}/health")[1]))
        asker.start()
        time.sleep(HOLD_S)
        for sock in holders:  # the threads are free again, and one takes the waiting /health
            sock.sendall(b"}")
        asker.join(10)
    finally:
        for sock in holders:
            sock.close()
    after = requests.get(f"{url}/metrics", timeout=5).text
    assert health and health[0] >= HOLD_S - 0.1
    seconds = _histogram(after, "segmask_request_seconds", route="/health")
    earlier = _histogram(before, "segmask_request_seconds", route="/health")
    assert seconds[1] - earlier[1] == 1
    assert seconds[0] - earlier[0] >= HOLD_S - 0.1, "the wait for a thread is missing from the latency"
    waited = _histogram(after, "segmask_request_thread_wait_seconds")[0]
    assert waited - _histogram(before, "segmask_request_thread_wait_seconds")[0] >= HOLD_S - 0.1


# --- several server processes ------------------------------------------------------------------------


def _get_ok(url: str) -> None:
    assert requests.get(url, timeout=10).ok


def _requests_per_process(directory: Path, route: str) -> list[float]:
    """The count of 200s on ``route`` each server process wrote to the shared metrics directory."""
    counts = []
    for path in sorted(directory.glob("counter_*.db")):
        samples = [s for m in MultiProcessCollector.merge([str(path)]) for s in m.samples]
        counts.append(
            sum(
                s.value
                for s in samples
                if s.name == "segmask_requests_total" and s.labels == {"route": route, "status": "200"}
            )
        )
    return counts


@pytest.mark.slow
def test_metrics_are_summed_over_the_server_processes(tmp_path):
    require_redis()
    env = {
        "SEGMASK_REDIS_URL": REDIS_URL,
        "SEGMASK_QUEUE_PREFIX": f"capacity-{uuid.uuid4().hex[:8]}",
        "TMPDIR": str(tmp_path),  # where the server makes its shared metrics directory
    }
    proc, url = start_server(env, tmp_path / "serve.log")
    try:
        [directory] = tmp_path.glob("segmask-metrics-*")
        sent = 0
        # Connections go to whichever process accepts first: ask until both have served some.
        for _ in range(20):
            batch = [threading.Thread(target=_get_ok, args=(f"{url}/versions",)) for _ in range(10)]
            for thread in batch:
                thread.start()
            for thread in batch:
                thread.join(10)
            sent += len(batch)
            per_process = _requests_per_process(directory, "/versions")
            if len(per_process) == 2 and min(per_process) > 0:
                break
        assert len(per_process) == 2 and min(per_process) > 0, per_process
        for _ in range(4):  # whichever process answers
            text = requests.get(f"{url}/metrics", timeout=5).text
            assert f'segmask_requests_total{{route="/versions",status="200"}} {float(sent)}' in text
            assert "segmask_redis_up 1.0" in text
    finally:
        stop(proc)
    assert not directory.exists()
