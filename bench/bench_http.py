"""Click -> polygon latency as Label Studio sees it: in-process, through HTTP (embedded mode) and through
HTTP + Redis/RQ with 1 and 3 workers, with GrabCut-from-box on the same objects in the same run.

For each of ``--images`` held-out COCO128 images (image_id % 5 == 0): first the task-open request (Label
Studio's ``/predict`` of one task without a prompt, when "Retrieve predictions when loading a task
automatically" is on; ``open``), then the first click on the image (``first``), then ``--repeats`` further
clicks (``repeated``), one per annotated object in turn (interior point farthest from its boundary,
docs/targets.md). With ``--no-open`` the first click finds nothing cached (image read + trunk). Every path
sees the same requests in the same order; paths are interleaved image by image so background load hits them
alike.

- ``in-process``: ``backend.runtime.Runtime`` called directly (the work without HTTP or queue);
- ``http embedded``: ``segmask serve`` (gunicorn) in embedded mode, real HTTP from this process;
- ``http + rq, N workers``: ``segmask serve`` with SEGMASK_REDIS_URL and N ``segmask worker`` processes
  (SEGMASK_WORKERS_PER_HOST=N: they share the cores), for each N of ``--workers``; clicks find the worker
  that holds their image's features through backend.affinity, and reach it through its click lane
  (backend.click_lane);
- ``grabcut box``: OpenCV GrabCut (5 iterations) from each object's tight box (docs/targets.md's baseline).

Images are read by the servers from ``/data/local-files/?d=`` (SEGMASK_LOCAL_FILES_ROOT), as with Label
Studio's local storage. Prints a table (p50/p95 ms, ratios to in-process and first vs repeated click) and
writes JSON. A benchmark, never a pass/fail test::

    .venv/bin/python bench/bench_http.py [--images 8] [--repeats 10] [--workers 1,3] [--no-open]
        [--redis-url redis://127.0.0.1:6379/15]
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

from backend.allocator import ALLOCATOR_ENV, ensure_allocator_env
from backend.runtime import Runtime
from backend.settings import DEFAULT_DATA_DIR, Settings
from segmodels.annotator import click_point
from segmodels.baselines import grabcut_mask
from segmodels.geometry import coco_segmentation_to_mask, mask_to_box
from segmodels.splits import in_split

REPO = Path(__file__).resolve().parents[1]
DATA = DEFAULT_DATA_DIR
LS_REQUESTS = REPO / "tests" / "fixtures" / "label-studio-requests"  # recorded from Label Studio 1.23.2
DEFAULT_OUT = REPO / "bench" / "results" / "http.json"

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


def open_body(template: dict, image: dict) -> dict:
    """The captured batch request cut to one task showing ``image``: what Label Studio sends when an
    annotator opens a task ("Retrieve predictions when loading a task automatically")."""
    body = json.loads(json.dumps(template))
    body["tasks"] = body["tasks"][:1]
    body["tasks"][0]["data"]["image"] = f"/data/local-files/?d={image['file_name']}"
    return body


class Server:
    """A ``segmask serve`` process (and ``workers`` ``segmask worker`` processes) on a free port."""

    def __init__(self, env: dict[str, str], logs: Path, workers: int = 0) -> None:
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
        for n in range(workers):
            worker_env = {**env, "SEGMASK_WORKERS_PER_HOST": str(workers)}
            self.procs.append(self._start([*cli, "worker"], worker_env, logs / f"worker-{self.port}-{n}.log"))
        self.procs.append(self._start([*cli, "serve"], env, logs / f"serve-{self.port}.log"))
        self._wait_ready(env)

    @staticmethod
    def _start(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)

    def _wait_ready(self, env: dict[str, str], timeout: float = 120) -> None:
        """Until /health answers and, with Redis, every worker has registered on the interactive queue."""
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
            workers = len(self.procs) - 1
            if healthy and (
                queue is None or Worker.count(connection=queue.connection, queue=queue) >= workers
            ):
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
    base = out["in-process"]
    for path, kinds in out.items():
        kinds["first_vs_repeated"] = kinds["first"]["p50_ms"] / kinds["repeated"]["p50_ms"]
        if path != "in-process":
            for kind in ("first", "repeated"):
                kinds[f"{kind}_overhead_vs_in_process"] = kinds[kind]["p50_ms"] / base[kind]["p50_ms"]
    return out


WIDTHS = (20, 9, 4, 9, 9, 9, 20, 18)


def _line(cells: list[str]) -> str:
    return " ".join(
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, WIDTHS, strict=True))
    )


def print_table(summary: dict) -> None:
    header = ["path", "request", "n", "p50 ms", "p95 ms", "min ms", "p50 vs in-process", "first vs repeated"]
    print("\n" + _line(header))
    for path, kinds in summary.items():
        for kind, row in kinds.items():
            if not isinstance(row, dict):
                continue
            ratio = kinds.get(f"{kind}_overhead_vs_in_process")
            first = kinds.get("first_vs_repeated") if kind == "first" else None
            stats = [f"{row[k]:.1f}" for k in ("p50_ms", "p95_ms", "min_ms")]
            cells = [
                path,
                kind,
                str(row["n"]),
                *stats,
                f"{ratio:.2f}x" if ratio else "",
                f"{first:.2f}x" if first else "",
            ]
            print(_line(cells))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8, help="held-out images (first by id)")
    parser.add_argument("--repeats", type=int, default=10, help="repeated clicks per image")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument(
        "--workers",
        default="1,3",
        help="comma-separated worker counts, one http + rq path each (default 1,3)",
    )
    parser.add_argument(
        "--no-open",
        action="store_true",
        help="click a new image cold, without Label Studio's task-open /predict first",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    coco = json.loads((DATA / "instances.json").read_text())
    template = json.loads((LS_REQUESTS / "predict-interactive-keypoint.json").read_text())["json"]
    batch_template = json.loads((LS_REQUESTS / "predict-batch.json").read_text())["json"]
    worker_counts = [int(n) for n in args.workers.split(",") if n]
    images = [im for im in sorted(coco["images"], key=lambda im: im["id"]) if in_split(im["id"], "val")]
    images = [im for im in images if objects_of(im, coco)][: args.images]

    logs = REPO / "bench" / "results" / "http-logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = {"SEGMASK_LOCAL_FILES_ROOT": str(DATA / "images"), "SEGMASK_LOG_LEVEL": "WARNING"}
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    redis.Redis.from_url(args.redis_url).ping()
    servers = {"http embedded": Server(common, logs)}
    for n in worker_counts:
        env = {**common, "SEGMASK_REDIS_URL": args.redis_url, "SEGMASK_QUEUE_PREFIX": f"{prefix}-{n}"}
        servers[f"http + rq, {n} worker{'s' if n > 1 else ''}"] = Server(env, logs, workers=n)
    paths = ["in-process", *servers]
    runtime = Runtime(Settings.from_env({}, local_files_root=str(DATA / "images")))
    kinds = ["first", "repeated"] if args.no_open else ["open", "first", "repeated"]
    samples: dict[str, dict[str, list[float]]] = {p: {k: [] for k in kinds} for p in paths}
    samples["grabcut box"] = {"per object": []}
    try:
        for n, image in enumerate(images):
            masks = objects_of(image, coco)
            bodies = [
                click_body(template, image, masks[k % len(masks)], k * NUDGE_PX)
                for k in range(args.repeats + 1)
            ]
            for path in paths:
                if not args.no_open:
                    opened = open_body(batch_template, image)
                    if path == "in-process":
                        started = time.perf_counter()
                        ref = {"url": opened["tasks"][0]["data"]["image"], "project": ""}
                        runtime.detect({"image": ref, "output": "polygon"})
                        samples[path]["open"].append(time.perf_counter() - started)
                    else:
                        samples[path]["open"].append(servers[path].predict(opened)[0])
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

    summary = summarise({p: samples[p] for p in paths})
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
        "workers": worker_counts,
        "opened_first": not args.no_open,
        "summary": summary,
        "samples_s": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    ensure_allocator_env()
    main()
