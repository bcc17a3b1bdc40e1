"""What RQ itself costs a click: the round trip of a job that does nothing, from ``enqueue`` to its result,
through the same Redis and the same kind of worker as ``segmask worker`` (an RQ SimpleWorker, JSON
serializer, results read with ``job.latest_result``, as ``backend.rq_dispatcher.RQDispatcher`` does); and
the same no-op through the click lane that a click on an image a worker holds takes instead
(``backend.click_lane``: ``send_click`` to a ``ClickLane`` served by another process).

The floor under the ``http + rq`` path of ``bench_http.py``: whatever that path costs above this and above
``http embedded`` is the model's work competing with the worker process for the cores. A benchmark, never a
pass/fail test; prints a table and writes JSON::

    .venv/bin/python bench/bench_rq_floor.py [--jobs 200] [--redis-url redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from backend.click_lane import ClickLane, send_click
from backend.model_lock import ModelLock

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "rq_floor.json"
WARMUP = 20
LANE_WORKER = "bench-lane"


def noop(request: dict) -> dict:
    """The job: returns at once, with a payload shaped like a click's result."""
    return {"objects": [], "seconds": {}, "echo": request.get("n")}


def start_worker(redis_url: str, queue: str) -> subprocess.Popen:
    """``rq worker`` (SimpleWorker, JSON) on ``queue``, importing this module as ``bench_rq_floor``."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "rq.cli", "worker", "-u", redis_url, "-w", "rq.SimpleWorker"]
    command += ["--serializer", "rq.serializers.JSONSerializer", queue]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_worker(connection: redis.Redis, queue: Queue, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not Worker.all(connection=connection, queue=queue):
        if time.monotonic() > deadline:
            raise SystemExit("the rq worker did not start")
        time.sleep(0.1)


def measure(queue: Queue, jobs: int) -> dict[str, list[float]]:
    """Milliseconds per job: ``enqueue`` alone, and enqueue to result."""
    samples: dict[str, list[float]] = {"enqueue": [], "round trip": []}
    for n in range(WARMUP + jobs):
        started = time.perf_counter()
        job = queue.enqueue("bench_rq_floor.noop", {"n": n}, result_ttl=60)
        enqueued = time.perf_counter()
        if job.latest_result(timeout=10) is None:
            raise SystemExit(f"job {job.id} got no result within 10 s")
        if n >= WARMUP:
            samples["enqueue"].append((enqueued - started) * 1000)
            samples["round trip"].append((time.perf_counter() - started) * 1000)
    return samples


def serve_lane(redis_url: str, prefix: str) -> None:
    """The worker's side of the click lane with the no-op job, taking a model lock as the runtime does (so
    the lane claims each click), until killed (``--serve-lane``)."""
    lock = ModelLock()

    def locked_noop(request: dict) -> dict:
        with lock:
            return noop(request)

    ClickLane(redis.Redis.from_url(redis_url), prefix, LANE_WORKER, locked_noop).start()
    threading.Event().wait()


def measure_lane(connection: redis.Redis, prefix: str, jobs: int) -> list[float]:
    """Milliseconds per no-op click through the lane, ``send_click`` to its result."""
    samples = []
    for n in range(WARMUP + jobs):
        started = time.perf_counter()
        send_click(connection, prefix, LANE_WORKER, {"n": n}, timeout=10).result()
        if n >= WARMUP:
            samples.append((time.perf_counter() - started) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--serve-lane", metavar="PREFIX", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_lane:
        serve_lane(args.redis_url, args.serve_lane)
        return
    connection = redis.Redis.from_url(args.redis_url)
    name = f"segmask-rq-floor-{uuid.uuid4().hex[:6]}"
    queue = Queue(name, connection=connection, serializer=JSONSerializer)
    worker = start_worker(args.redis_url, queue.name)
    lane = subprocess.Popen([sys.executable, __file__, "--redis-url", args.redis_url, "--serve-lane", name])
    try:
        wait_for_worker(connection, queue)
        samples = measure(queue, args.jobs)
        samples["lane round trip"] = measure_lane(connection, name, args.jobs)
    finally:
        for process in (worker, lane):
            process.terminate()
            process.wait(timeout=10)
    rows = {
        name: {
            "n": len(values),
            "p50_ms": statistics.median(values),
            "p95_ms": float(np.percentile(values, 95)),
            "min_ms": min(values),
        }
        for name, values in samples.items()
    }
    print(f"{'stage':<16} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'min ms':>8}")
    for name, r in rows.items():
        print(f"{name:<16} {r['n']:>5} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} {r['min_ms']:>8.2f}")
    record = {
        "benchmark": "rq_floor",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "redis_url": args.redis_url,
        "rows": rows,
        "samples_ms": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
