"""Click -> polygon latency as Label Studio sees it: in-process, through HTTP (embedded mode) and through
HTTP + Redis/RQ + a worker, with GrabCut-from-box on the same objects in the same run.

For each of ``--images`` held-out COCO128 images (image_id % 5 == 0), the first click (a new image: image
read + trunk) and then ``--repeats`` further clicks on the same image (cached features), one per annotated
object in turn (interior point farthest from its boundary, docs/targets.md). Every path sees the same requests
in the same order; paths are interleaved image by image so background load hits them alike.

- ``in-process``: ``backend.jobs.Runtime.segment`` called directly (the work without HTTP or queue);
- ``http embedded``: ``segmask serve`` (gunicorn) in embedded mode, real HTTP from this process;
- ``http + rq``: ``segmask serve`` with SEGMASK_REDIS_URL and one ``segmask worker`` process;
- ``grabcut box``: OpenCV GrabCut (5 iterations) from each object's tight box (docs/targets.md's baseline).

Images are read by the servers from ``/data/local-files/?d=`` (SEGMASK_LOCAL_FILES_ROOT), as with Label
Studio's local storage. Prints a table (p50/p95 ms) and writes JSON. A benchmark, never a pass/fail test::

    .venv/bin/python bench/bench_http.py [--images 8] [--repeats 10] [--redis-url redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import redis
import requests
from rq import Queue, Worker

from backend.cli import ALLOCATOR_ENV
from backend.jobs import Runtime
from backend.settings import DEFAULT_DATA_DIR, Settings
from segmodels.annotator import click_point
from segmodels.data import in_split
from segmodels.evaluate import grabcut_mask
from segmodels.geometry import coco_segmentation_to_mask, mask_to_box

REPO = Path(__file__).resolve().parents[1]
DATA = DEFAULT_DATA_DIR
LS_REQUESTS = REPO / "tests" / "fixtures" / "label-studio-requests"  # recorded from Label Studio 1.23.2
DEFAULT_OUT = REPO / "bench" / "results" / "http.json"
PATHS = ("in-process", "http embedded", "http + rq")

log = logging.getLogger("bench_http")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def objects_of(image: dict, coco: dict) -> list[np.ndarray]:
    """GT masks of the image's non-crowd objects larger than 32x32 px, largest first."""
    anns = [
        a
        for a in coco["annotations"]
        if a["image_id"] == image["id"] and not a["iscrowd"] and a["area"] > 32 * 32
    ]
    anns.sort(key=lambda a: -a["area"])
    return [coco_segmentation_to_mask(a["segmentation"], image["height"], image["width"]) for a in anns]


# Each click of an image moves this much further right: no two prompts are the same (the predictor memoises
# an image's last prompts; an annotator never sends the same one twice).
NUDGE_PX = 0.01


def click_body(template: dict, image: dict, mask: np.ndarray, nudge: float = 0.0) -> dict:
    """The captured Label Studio keypoint request, clicking ``mask``'s interior point on ``image``, moved
    right by ``nudge`` px (so that a repeated click is a new prompt, never a memoised one)."""
    x, y = click_point(mask)
    x += nudge
    body = json.loads(json.dumps(template))
    body["tasks"][0]["data"]["image"] = f"/data/local-files/?d={image['file_name']}"
    item = body["params"]["context"]["result"][0]
    item["value"].update(x=x / image["width"] * 100, y=y / image["height"] * 100)
    item.update(original_width=image["width"], original_height=image["height"])
    return body


class Server:
    """A ``segmask serve`` (and optionally ``segmask worker``) process group on a free port."""

    def __init__(self, env: dict[str, str], logs: Path, worker: bool) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            **ALLOCATOR_ENV,
            **env,
            "SEGMASK_PORT": str(self.port),
            "SEGMASK_HOST": "127.0.0.1",
        }
        cli = [sys.executable, "-m", "backend.cli"]
        self.procs = []
        if worker:
            self.procs.append(self._start([*cli, "worker"], env, logs / "worker.log"))
        self.procs.append(self._start([*cli, "serve"], env, logs / f"serve-{self.port}.log"))
        self._wait_ready(env)

    @staticmethod
    def _start(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)

    def _wait_ready(self, env: dict[str, str], timeout: float = 120) -> None:
        """Until /health answers and, with Redis, a worker has registered on the interactive queue."""
        queue = None
        if env.get("SEGMASK_REDIS_URL"):
            connection = redis.Redis.from_url(env["SEGMASK_REDIS_URL"])
            queue = Queue(f"{env['SEGMASK_QUEUE_PREFIX']}:interactive", connection=connection)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                healthy = requests.get(f"{self.url}/health", timeout=1).ok
            except requests.RequestException:
                healthy = False
            if healthy and (queue is None or Worker.count(connection=queue.connection, queue=queue)):
                return
            time.sleep(0.3)
        raise RuntimeError(f"server on {self.url} did not become ready in {timeout} s")

    def predict(self, body: dict) -> tuple[float, dict]:
        started = time.perf_counter()
        answer = requests.post(f"{self.url}/predict", json=body, timeout=100)
        elapsed = time.perf_counter() - started
        answer.raise_for_status()
        return elapsed, answer.json()

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def job_request(body: dict) -> dict:
    """What the server would enqueue for ``body`` (a keypoint click), for the in-process path."""
    item = body["params"]["context"]["result"][0]
    return {
        "image": {"url": body["tasks"][0]["data"]["image"], "project": ""},
        "prompt": {"points": [[item["value"]["x"], item["value"]["y"]]], "positive": [True], "box": None},
        "output": "polygon",
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")


def summarise(samples: dict[str, dict[str, list[float]]]) -> dict:
    out = {}
    for path, kinds in samples.items():
        out[path] = {
            kind: {
                "n": len(v),
                "p50_ms": percentile(v, 50),
                "p95_ms": percentile(v, 95),
                "min_ms": percentile(v, 0),
            }
            for kind, v in kinds.items()
        }
    base = out["in-process"]["repeated"]["p50_ms"]
    for path in ("http embedded", "http + rq"):
        if path in out:
            out[path]["repeated_overhead_vs_in_process"] = out[path]["repeated"]["p50_ms"] / base
            out[path]["first_overhead_vs_in_process"] = (
                out[path]["first"]["p50_ms"] / out["in-process"]["first"]["p50_ms"]
            )
    return out


WIDTHS = (16, 9, 4, 9, 9, 9, 20)


def _line(cells: list[str]) -> str:
    return " ".join(
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, WIDTHS, strict=True))
    )


def print_table(summary: dict) -> None:
    print("\n" + _line(["path", "clicks", "n", "p50 ms", "p95 ms", "min ms", "p50 vs in-process"]))
    for path, kinds in summary.items():
        for kind, row in kinds.items():
            if not isinstance(row, dict):
                continue
            ratio = kinds.get(f"{kind}_overhead_vs_in_process")
            stats = [f"{row[k]:.1f}" for k in ("p50_ms", "p95_ms", "min_ms")]
            print(_line([path, kind, str(row["n"]), *stats, f"{ratio:.2f}x" if ratio else ""]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8, help="held-out images (first by id)")
    parser.add_argument("--repeats", type=int, default=10, help="repeated clicks per image")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    coco = json.loads((DATA / "instances.json").read_text())
    template = json.loads((LS_REQUESTS / "predict-interactive-keypoint.json").read_text())["json"]
    images = [im for im in sorted(coco["images"], key=lambda im: im["id"]) if in_split(im["id"], "val")]
    images = [im for im in images if objects_of(im, coco)][: args.images]

    logs = REPO / "bench" / "results" / "http-logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = {"SEGMASK_LOCAL_FILES_ROOT": str(DATA / "images"), "SEGMASK_LOG_LEVEL": "WARNING"}
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    redis.Redis.from_url(args.redis_url).ping()
    servers = {
        "http embedded": Server(common, logs, worker=False),
        "http + rq": Server(
            {**common, "SEGMASK_REDIS_URL": args.redis_url, "SEGMASK_QUEUE_PREFIX": prefix}, logs, True
        ),
    }
    runtime = Runtime(Settings.from_env({}, local_files_root=str(DATA / "images")))
    samples: dict[str, dict[str, list[float]]] = {p: {"first": [], "repeated": []} for p in PATHS}
    samples["grabcut box"] = {"per object": []}
    try:
        for n, image in enumerate(images):
            masks = objects_of(image, coco)
            bodies = [
                click_body(template, image, masks[k % len(masks)], k * NUDGE_PX)
                for k in range(args.repeats + 1)
            ]
            for path in PATHS:
                for k, body in enumerate(bodies):
                    kind = "first" if k == 0 else "repeated"
                    if path == "in-process":
                        started = time.perf_counter()
                        runtime.segment(job_request(body))
                        samples[path][kind].append(time.perf_counter() - started)
                    else:
                        elapsed, answer = servers[path].predict(body)
                        assert answer["results"][0]["result"], (
                            f"{path}: empty result for {image['file_name']}"
                        )
                        samples[path][kind].append(elapsed)
            pixels = cv2.cvtColor(cv2.imread(str(DATA / "images" / image["file_name"])), cv2.COLOR_BGR2RGB)
            for mask in masks[: args.repeats]:
                started = time.perf_counter()
                grabcut_mask(pixels, mask_to_box(mask))
                samples["grabcut box"]["per object"].append(time.perf_counter() - started)
            print(f"image {n + 1}/{len(images)} {image['file_name']} done", flush=True)
    finally:
        for server in servers.values():
            server.stop()

    summary = summarise({p: samples[p] for p in PATHS})
    summary["grabcut box"] = {
        "per object": {
            "n": len(samples["grabcut box"]["per object"]),
            "p50_ms": percentile(samples["grabcut box"]["per object"], 50),
            "p95_ms": percentile(samples["grabcut box"]["per object"], 95),
            "min_ms": percentile(samples["grabcut box"]["per object"], 0),
        }
    }
    print_table(summary)
    record = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "images": [im["file_name"] for im in images],
        "repeats": args.repeats,
        "summary": summary,
        "samples_s": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    if any(k not in os.environ for k in ALLOCATOR_ENV):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})
    main()
