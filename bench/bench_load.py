"""A team of annotators at once: N simulated annotators against embedded mode and against Redis + workers.

Each annotator works on their own COCO128 image (annotator k starts at image k, then moves on), as a person
would: for each of the image's ``--objects`` largest objects, a first click, then corrective clicks at a
human pace (one every 1-3 s, uniformly), each placed by the simulated annotator of interactive segmentation
(segmodels.annotator: the deepest point of the larger error region, positive or negative) on the polygon the
backend returned, until the polygon reaches IoU 0.9 with the object or ``--clicks`` clicks were made; then
the next object, and the next image. With probability ``--batch-share`` per click, the annotator also sends
a batch /predict of 4 tasks (Label Studio's pre-annotation of imported tasks). Requests are Label Studio's
captured 1.23.2 bodies.

The backend runs as deployed (``segmask serve``, ``segmask worker``, with the allocator settings they give
themselves, backend.allocator.ALLOCATOR_ENV), with
SEGMASK_FEATURE_CACHE_MB set to ``--cache-mb-per-annotator`` times the largest N of the run (the sizing the
README advises: every annotator's image stays cached, in each worker).

A poller asks ``/health`` every 0.5 s (Label Studio waits 1 s for it) and ``/metrics`` every 5 s; a sampler
reads the RSS of every backend process (server, its gunicorn children, workers) every second. Every run is
bounded in time (``--seconds`` of load, then the annotators finish their request in flight).

Prints a table per run (statuses, click p50/p95/max, batch p50/max, /health p50/max and answers over 1 s,
RSS at warm-up and end of every process) and, per set-up, the largest N with zero errors and click p95
<= 1 s. Writes JSON. A benchmark, never a pass/fail test::

    .venv/bin/python bench/bench_load.py [--annotators 10,25,50] [--setups embedded,rq1,rq2] [--seconds 60]

Set-ups: ``embedded`` (no Redis), ``rqN`` (Redis and N workers on this machine, each told so with
SEGMASK_WORKERS_PER_HOST=N), ``rqN-unsized`` (the same without it: every worker sizes PyTorch to every core);
``-slotsK`` after any of them sets SEGMASK_MODEL_SLOTS=K in every model process (``embedded-slots1``: one
request at a time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import redis
import requests
from bench_http import DATA, LS_REQUESTS, REPO, free_port, objects_of
from rq import Queue, Worker

from backend.allocator import ensure_allocator_env
from segmodels.annotator import click_point, next_click

DEFAULT_OUT = REPO / "bench" / "results" / "load.json"
BATCH_TASKS = 4
GOOD_IOU = 0.9
HEALTH_EVERY_S = 0.5
METRICS_EVERY_S = 5.0
# Client timeouts: Label Studio's own (ML_TIMEOUT_PREDICT 100 s; /health 1 s is checked in the report).
PREDICT_TIMEOUT_S = 100.0
HEALTH_TIMEOUT_S = 10.0

log = logging.getLogger("bench_load")


@dataclass(frozen=True)
class Setup:
    """How the backend runs: embedded (the model in the server) or Redis with ``workers`` worker processes."""

    name: str
    workers: int
    # Whether the workers are told how many share the machine (SEGMASK_WORKERS_PER_HOST), so that each
    # takes its share of the cores; "rqN-unsized" leaves it at 1: every worker takes every core.
    sized: bool = True
    # SEGMASK_MODEL_SLOTS of every model process ("-slotsK"); 0: the default (auto).
    slots: int = 0

    @classmethod
    def parse(cls, name: str) -> Setup:
        base, *options = name.split("-")
        slots = [o.removeprefix("slots") for o in options if o.startswith("slots")]
        unknown = [o for o in options if o != "unsized" and not o.startswith("slots")]
        count = base.removeprefix("rq")
        workers = (
            0
            if base == "embedded"
            else int(count)
            if base.startswith("rq") and count.isdigit() and int(count) > 0
            else -1
        )
        if (
            workers < 0
            or unknown
            or len(slots) > 1
            or (slots and not (slots[0].isdigit() and int(slots[0]) > 0))
            or ("unsized" in options and not workers)
        ):
            raise SystemExit(
                f"unknown set-up {name!r}: embedded or rqN (N workers), optionally -unsized (rqN only) and "
                "-slotsK (SEGMASK_MODEL_SLOTS=K), e.g. rq2, embedded-slots1"
            )
        return cls(name, workers, sized="unsized" not in options, slots=int(slots[0]) if slots else 0)


@dataclass
class Record:
    """What one run saw, appended to by many threads (list.append is atomic in CPython)."""

    clicks: list[tuple[str, int, float]] = field(default_factory=list)  # (first|corrective, status, s)
    batches: list[tuple[int, float]] = field(default_factory=list)
    health: list[float | None] = field(default_factory=list)  # seconds, None when no answer in time
    metrics: list[float | None] = field(default_factory=list)
    rss: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # name -> [(t, MiB)]
    ious: list[float] = field(default_factory=list)


class Backend:
    """``segmask serve`` (and ``segmask worker`` processes) on a free port, stopped by :meth:`stop`."""

    def __init__(self, setup: Setup, logs: Path, redis_url: str, cache_mb: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "SEGMASK_FEATURE_CACHE_MB": str(cache_mb),
            "SEGMASK_PORT": str(self.port),
            "SEGMASK_HOST": "127.0.0.1",
            "SEGMASK_LOCAL_FILES_ROOT": str(DATA / "images"),
            "SEGMASK_LOG_LEVEL": "WARNING",
        }
        if setup.slots:
            env["SEGMASK_MODEL_SLOTS"] = str(setup.slots)
        self.queue: Queue | None = None
        if setup.workers:
            prefix = f"load-{uuid.uuid4().hex[:6]}"
            env.update(
                SEGMASK_REDIS_URL=redis_url,
                SEGMASK_QUEUE_PREFIX=prefix,
                SEGMASK_WORKERS_PER_HOST=str(setup.workers if setup.sized else 1),
            )
            self.queue = Queue(f"{prefix}:interactive", connection=redis.Redis.from_url(redis_url))
        cli = [sys.executable, "-m", "backend.cli"]
        self.procs: dict[str, subprocess.Popen] = {}
        for n in range(setup.workers):
            self.procs[f"worker {n + 1}"] = _start([*cli, "worker"], env, logs / f"worker-{n + 1}.log")
        self.procs["server"] = _start([*cli, "serve"], env, logs / f"serve-{setup.name}.log")
        self._wait_ready(setup.workers)

    def _wait_ready(self, workers: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                healthy = requests.get(f"{self.url}/health", timeout=1).ok
            except requests.RequestException:
                healthy = False
            if healthy and (
                self.queue is None
                or Worker.count(connection=self.queue.connection, queue=self.queue) >= workers
            ):
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"backend on {self.url} was not ready within {timeout} s")

    def processes(self) -> dict[str, int]:
        """Every backend process: the started ones and their children (gunicorn's worker), by name."""
        found = {}
        for name, proc in self.procs.items():
            found[name] = proc.pid
            for n, child in enumerate(_children(proc.pid)):
                found[f"{name} child {n + 1}"] = child
        return found

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _start(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def rss_mib(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (Linux /proc), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Work:
    """An image and its objects, with the bodies a Label Studio user's requests are made of."""

    image: dict
    masks: list[np.ndarray]


class Annotator(threading.Thread):
    """One simulated person: clicks and corrects objects on their images until ``stop_at``."""

    def __init__(
        self, k: int, url: str, works: list[Work], templates: dict, args, record: Record, stop_at: float
    ) -> None:
        super().__init__(daemon=True, name=f"annotator-{k}")
        self.k, self.url, self.works, self.templates = k, url, works, templates
        self.args, self.record, self.stop_at = args, record, stop_at
        self.rng = random.Random(k)
        self.session = requests.Session()

    def run(self) -> None:
        n = self.k
        while time.monotonic() < self.stop_at:
            work = self.works[n % len(self.works)]
            for gt in work.masks[: self.args.objects]:
                if time.monotonic() >= self.stop_at:
                    return
                self.label(work, gt)
            n += self.args.annotators_max

    def label(self, work: Work, gt: np.ndarray) -> None:
        """Click the object ``gt`` of ``work`` until it is good or the clicks are used up (after a human
        pause: the annotator finds the object)."""
        if not self.pause(self.rng.uniform(1.0, 3.0)):
            return
        x, y = click_point(gt)
        clicks = [(x, y, True)]
        pred = None
        for n in range(self.args.clicks):
            status, elapsed, pred = self.click(work, clicks)
            self.record.clicks.append(("first" if n == 0 else "corrective", status, elapsed))
            if self.rng.random() < self.args.batch_share:
                self.batch()
            if pred is None or _iou(pred, gt) >= GOOD_IOU:
                break
            correction = next_click(pred, gt)
            if correction is None or not self.pause(self.rng.uniform(1.0, 3.0)):
                break
            (cx, cy), label = correction
            clicks.append((cx, cy, bool(label)))
        if pred is not None:
            self.record.ious.append(_iou(pred, gt))

    def pause(self, seconds: float) -> bool:
        """Think for ``seconds`` (a human pace); False when the run ends first."""
        left = self.stop_at - time.monotonic()
        time.sleep(max(0.0, min(seconds, left)))
        return seconds < left

    def click(
        self, work: Work, clicks: list[tuple[float, float, bool]]
    ) -> tuple[int, float, np.ndarray | None]:
        """POST the interactive /predict of ``clicks`` (pixels); (status, seconds, the returned mask)."""
        body = keypoint_body(self.templates["keypoint"], work.image, clicks)
        status, elapsed, answer = self.post(body)
        if status != 200:
            return status, elapsed, None
        return status, elapsed, _answer_mask(answer, work.image)

    def batch(self) -> None:
        start = self.rng.randrange(len(self.works))
        images = [self.works[(start + i) % len(self.works)].image for i in range(BATCH_TASKS)]
        status, elapsed, _ = self.post(batch_body(self.templates["batch"], images))
        self.record.batches.append((status, elapsed))

    def post(self, body: dict) -> tuple[int, float, dict | None]:
        started = time.perf_counter()
        try:
            answer = self.session.post(f"{self.url}/predict", json=body, timeout=PREDICT_TIMEOUT_S)
        except requests.RequestException as exc:
            log.warning("%s: %s", self.name, exc)
            return 0, time.perf_counter() - started, None
        elapsed = time.perf_counter() - started
        return answer.status_code, elapsed, answer.json() if answer.ok else None


def keypoint_body(template: dict, image: dict, clicks: list[tuple[float, float, bool]]) -> dict:
    """Label Studio's keypoint /predict with smart points ``(x px, y px, positive)`` on ``image``."""
    body = json.loads(json.dumps(template))
    body["tasks"][0]["data"]["image"] = f"/data/local-files/?d={image['file_name']}"
    item = body["params"]["context"]["result"][0]
    items = []
    for x, y, positive in clicks:
        point = json.loads(json.dumps(item))
        point["value"].update(x=x / image["width"] * 100, y=y / image["height"] * 100)
        point.update(original_width=image["width"], original_height=image["height"], is_positive=positive)
        items.append(point)
    body["params"]["context"]["result"] = items
    return body


def batch_body(template: dict, images: list[dict]) -> dict:
    """Label Studio's batch /predict with one task per image."""
    body = json.loads(json.dumps(template))
    task = body["tasks"][0]
    body["tasks"] = []
    for n, image in enumerate(images):
        copy = json.loads(json.dumps(task))
        copy.update(id=n + 1)
        copy["data"]["image"] = f"/data/local-files/?d={image['file_name']}"
        body["tasks"].append(copy)
    return body


def _answer_mask(answer: dict, image: dict) -> np.ndarray:
    """The polygon of an interactive answer rasterised at the image's size (empty when none came back)."""
    mask = np.zeros((image["height"], image["width"]), np.uint8)
    for result in answer.get("results") or []:
        for region in result.get("result") or []:
            points = (region.get("value") or {}).get("points")
            if points:
                pixels = np.asarray(points) / 100 * [image["width"], image["height"]]
                cv2.fillPoly(mask, [np.round(pixels).astype(np.int32)], 1)
    return mask.astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def poll(url: str, every: float, into: list, stop: threading.Event) -> None:
    """GET ``url`` every ``every`` s, recording the answer time (None: no 200 within HEALTH_TIMEOUT_S)."""
    session = requests.Session()
    while not stop.is_set():
        started = time.perf_counter()
        try:
            ok = session.get(url, timeout=HEALTH_TIMEOUT_S).ok
        except requests.RequestException:
            ok = False
        into.append(time.perf_counter() - started if ok else None)
        stop.wait(every)


def sample_rss(backend: Backend, into: dict, stop: threading.Event) -> None:
    started = time.monotonic()
    while not stop.is_set():
        for name, pid in backend.processes().items():
            value = rss_mib(pid)
            if value is not None:
                into.setdefault(name, []).append((time.monotonic() - started, value))
        stop.wait(1.0)


def run_load(setup: Setup, n: int, works: list[Work], templates: dict, args, logs: Path) -> dict:
    """One bounded run of ``n`` annotators on a fresh backend; its summary."""
    backend = Backend(setup, logs, args.redis_url, args.cache_mb_per_annotator * args.annotators_max)
    record = Record()
    stop = threading.Event()
    pollers = [
        threading.Thread(target=poll, args=(f"{backend.url}/health", HEALTH_EVERY_S, record.health, stop)),
        threading.Thread(target=poll, args=(f"{backend.url}/metrics", METRICS_EVERY_S, record.metrics, stop)),
        threading.Thread(target=sample_rss, args=(backend, record.rss, stop)),
    ]
    try:
        for thread in pollers:
            thread.start()
        stop_at = time.monotonic() + args.seconds
        annotators = [Annotator(k, backend.url, works, templates, args, record, stop_at) for k in range(n)]
        for annotator in annotators:
            annotator.start()
            time.sleep(args.stagger)
        for annotator in annotators:
            annotator.join(args.seconds + PREDICT_TIMEOUT_S + 10)
    finally:
        stop.set()
        for thread in pollers:
            thread.join(HEALTH_TIMEOUT_S + 2)
        backend.stop()
    return summarise(setup, n, record, args.seconds)


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


def summarise(setup: Setup, n: int, record: Record, seconds: float) -> dict:
    statuses: dict[str, int] = {}
    for _, status, _ in record.clicks:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ok_clicks = [s for _, status, s in record.clicks if status == 200]
    first = [s for kind, status, s in record.clicks if kind == "first" and status == 200]
    corrective = [s for kind, status, s in record.clicks if kind == "corrective" and status == 200]
    ok_batches = [s for status, s in record.batches if status == 200]
    health = [h for h in record.health if h is not None]
    rss = {
        name: {"first_mib": values[0][1], "max_mib": max(v for _, v in values), "last_mib": values[-1][1]}
        for name, values in record.rss.items()
    }
    errors = sum(1 for _, status, _ in record.clicks if status != 200) + sum(
        1 for status, _ in record.batches if status != 200
    )
    return {
        "setup": setup.name,
        "workers": setup.workers,
        "annotators": n,
        "seconds": seconds,
        "click_statuses": statuses,
        "clicks_per_s": len(record.clicks) / seconds,
        "errors": errors,
        "click_p50_ms": _ms(ok_clicks, 50),
        "click_p95_ms": _ms(ok_clicks, 95),
        "click_max_ms": _ms(ok_clicks, 100),
        "first_click_p50_ms": _ms(first, 50),
        "first_click_p95_ms": _ms(first, 95),
        "corrective_click_p95_ms": _ms(corrective, 95),
        "batches": len(record.batches),
        "batch_errors": sum(1 for status, _ in record.batches if status != 200),
        "batch_p50_ms": _ms(ok_batches, 50),
        "batch_max_ms": _ms(ok_batches, 100),
        "health_polls": len(record.health),
        "health_unanswered": sum(1 for h in record.health if h is None),
        "health_over_1s": sum(1 for h in record.health if h is None or h > 1.0),
        "health_p50_ms": _ms(health, 50),
        "health_max_ms": _ms(health, 100),
        "metrics_unanswered": sum(1 for m in record.metrics if m is None),
        "mean_final_iou": float(np.mean(record.ious)) if record.ious else float("nan"),
        "rss_mib": rss,
        "ok": errors == 0
        and _ms(ok_clicks, 95) <= 1000
        and not any(h is None or h > 1 for h in record.health),
    }


COLUMNS = (
    ("set-up", 11, lambda r: r["setup"]),
    ("N", 4, lambda r: str(r["annotators"])),
    ("clicks", 7, lambda r: str(sum(r["click_statuses"].values()))),
    ("statuses", 18, lambda r: " ".join(f"{k}:{v}" for k, v in sorted(r["click_statuses"].items()))),
    ("p50 ms", 8, lambda r: f"{r['click_p50_ms']:.0f}"),
    ("p95 ms", 8, lambda r: f"{r['click_p95_ms']:.0f}"),
    ("max ms", 8, lambda r: f"{r['click_max_ms']:.0f}"),
    ("first p50/p95", 13, lambda r: f"{r['first_click_p50_ms']:.0f}/{r['first_click_p95_ms']:.0f}"),
    ("corr p95", 8, lambda r: f"{r['corrective_click_p95_ms']:.0f}"),
    ("batch err/n", 11, lambda r: f"{r['batch_errors']}/{r['batches']}"),
    ("batch p50", 10, lambda r: f"{r['batch_p50_ms']:.0f}"),
    ("health p50/max ms", 18, lambda r: f"{r['health_p50_ms']:.0f}/{r['health_max_ms']:.0f}"),
    (">1s", 4, lambda r: str(r["health_over_1s"])),
    ("IoU", 5, lambda r: f"{r['mean_final_iou']:.2f}"),
    ("ok", 3, lambda r: "yes" if r["ok"] else "no"),
)


def print_rows(rows: list[dict]) -> None:
    print("\n" + " ".join(name.rjust(width) for name, width, _ in COLUMNS))
    for row in rows:
        print(" ".join(get(row).rjust(width) for _, width, get in COLUMNS))
    print("\nRSS MiB (first sample after start -> max -> last), per process:")
    for row in rows:
        cells = [
            f"{name} {v['first_mib']:.0f}->{v['max_mib']:.0f}->{v['last_mib']:.0f}"
            for name, v in row["rss_mib"].items()
        ]
        print(f"  {row['setup']:11} N={row['annotators']:<4} " + "; ".join(cells))


def capacity(rows: list[dict]) -> dict[str, int]:
    """Per set-up, the largest N run with zero errors, click p95 <= 1 s and /health always under 1 s."""
    best: dict[str, int] = {}
    for row in rows:
        best.setdefault(row["setup"], 0)
        if row["ok"]:
            best[row["setup"]] = max(best[row["setup"]], row["annotators"])
    return best


def load_works() -> list[Work]:
    coco = json.loads((DATA / "instances.json").read_text())
    works = []
    for image in sorted(coco["images"], key=lambda im: im["id"]):
        masks = objects_of(image, coco)
        if masks:
            works.append(Work(image, masks))
    return works


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--annotators", default="10,25,50", help="comma-separated numbers of annotators")
    parser.add_argument("--setups", default="embedded,rq1,rq2", help="set-ups, see above")
    parser.add_argument("--seconds", type=float, default=60.0, help="load time of each run")
    parser.add_argument("--clicks", type=int, default=6, help="most clicks per object")
    parser.add_argument("--objects", type=int, default=3, help="objects labelled per image, largest first")
    parser.add_argument("--batch-share", type=float, default=0.01, help="chance of a batch after a click")
    parser.add_argument("--cache-mb-per-annotator", type=int, default=64, help="feature cache sizing")
    parser.add_argument("--stagger", type=float, default=0.05, help="seconds between annotators' starts")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    counts = sorted({int(n) for n in args.annotators.split(",")})
    args.annotators_max = max(counts)
    setups = [Setup.parse(name) for name in args.setups.split(",")]
    if any(s.workers for s in setups):
        redis.Redis.from_url(args.redis_url).ping()

    works = load_works()
    templates = {
        "keypoint": json.loads((LS_REQUESTS / "predict-interactive-keypoint.json").read_text())["json"],
        "batch": json.loads((LS_REQUESTS / "predict-batch.json").read_text())["json"],
    }
    logs = REPO / "bench" / "results" / "load-logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for setup in setups:
        for n in counts:
            print(f"{setup.name}: {n} annotators for {args.seconds:.0f} s ...", flush=True)
            rows.append(run_load(setup, n, works, templates, args, logs))
            print_rows(rows[-1:])
    print_rows(rows)
    best = capacity(rows)
    print(
        "\nLargest N with zero errors, click p95 <= 1 s and /health always < 1 s: "
        + ", ".join(f"{name} {n or 'none of those run'}" for name, n in best.items())
    )
    record = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": rows,
        "capacity": best,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    ensure_allocator_env()
    main()
