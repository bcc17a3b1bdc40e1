"""Model slots: the clicks one model process serves per second when it runs several requests at once.

Each configuration runs in a fresh process (PyTorch fixes its thread pools once per process): the serving
code path of a model process (``backend.runtime.Runtime``, as embedded mode and workers run it) with
SEGMASK_MODEL_SLOTS=S and SEGMASK_TORCH_THREADS=T, and ``--clients`` threads sending it click jobs back to
back (no think time, so the model is never idle: this measures throughput, bench_load.py measures a team at
a human pace). Client k works on COCO128 images k, k + clients, ...: on each, for its ``--objects``
largest objects, a first click at the object's deepest point, then up to ``--clicks`` - 1 corrective clicks
placed by the simulated annotator (segmodels.annotator) on the mask that came back, until IoU 0.9. Every
image is new to the process, so first clicks run the trunk on their blocks and the background completion
of each image's pyramid competes for the model, as in service.

Prints a table (clicks/s, p50/p95 ms of a click, clicks/s against the first configuration) and writes JSON.
A benchmark, never a pass/fail test::

    .venv/bin/python bench/bench_model_slots.py [--configs 1x2,2x1,1x1] [--seconds 40] [--clients 4]

A configuration ``SxT`` is S slots of T PyTorch threads each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from bench_http import DATA, REPO, objects_of

DEFAULT_OUT = REPO / "bench" / "results" / "model_slots.json"
GOOD_IOU = 0.9


def parse_config(text: str) -> tuple[int, int]:
    """``"SxT"`` -> (slots, threads)."""
    slots, _, threads = text.partition("x")
    if not (slots.isdigit() and threads.isdigit() and int(slots) > 0 and int(threads) > 0):
        raise SystemExit(f"a configuration is SxT (S slots of T threads, both > 0), not {text!r}")
    return int(slots), int(threads)


def click_job(image: dict, clicks: list[tuple[float, float, bool]]) -> dict:
    """A segment job (backend.runtime's request) on COCO128 ``image``; ``clicks (x, y, positive)`` in
    pixels."""
    return {
        "image": {"url": f"/data/local-files/?d={image['file_name']}", "project": "1"},
        "prompt": {
            "points": [[x / image["width"] * 100, y / image["height"] * 100] for x, y, _ in clicks],
            "positive": [positive for _, _, positive in clicks],
        },
        "output": "polygon",
    }


def answer_mask(result: dict, image: dict) -> np.ndarray:
    """The job result's polygon rasterised at the image's size (empty when none came back)."""
    import cv2

    mask = np.zeros((image["height"], image["width"]), np.uint8)
    for obj in result["objects"]:
        pixels = np.asarray(obj["polygon"]) / 100 * [image["width"], image["height"]]
        cv2.fillPoly(mask, [np.round(pixels).astype(np.int32)], 1)
    return mask.astype(bool)


def annotate(runtime, images: list[dict], coco: dict, args, stop_at: float, into: list[float]) -> None:
    """One client: click its images' objects until ``stop_at``, appending each click's seconds to ``into``."""
    from segmodels.annotator import click_point, next_click
    from segmodels.geometry import mask_iou

    for image in images:
        for gt in objects_of(image, coco)[: args.objects]:
            x, y = click_point(gt)
            clicks = [(x, y, True)]
            for _ in range(args.clicks):
                if time.monotonic() >= stop_at:
                    return
                started = time.perf_counter()
                result = runtime.segment(click_job(image, clicks))
                into.append(time.perf_counter() - started)
                pred = answer_mask(result, image)
                if mask_iou(pred, gt) >= GOOD_IOU:
                    break
                step = next_click(pred, gt)
                if step is None:
                    break
                (x, y), positive = step
                clicks.append((x, y, bool(positive)))


def child(args) -> None:
    """Run one configuration in this process and print its figures as JSON."""
    from backend.runtime import Runtime
    from backend.settings import Settings
    from backend.torch_threads import apply_torch_threads

    slots, threads = parse_config(args.child)
    settings = Settings.from_env(
        {}, device="cpu", local_files_root=str(DATA / "images"), model_slots=slots, torch_threads=threads
    )
    plan = apply_torch_threads(settings)
    runtime = Runtime(settings, slots=plan.slots, threads=plan.threads)
    coco = json.loads((DATA / "instances.json").read_text())
    images = sorted(coco["images"], key=lambda i: i["id"])
    times: list[float] = []
    stop_at = time.monotonic() + args.seconds
    clients = [
        threading.Thread(
            target=annotate, args=(runtime, images[k :: args.clients], coco, args, stop_at, times)
        )
        for k in range(args.clients)
    ]
    started = time.monotonic()
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    wall = time.monotonic() - started
    print(
        json.dumps(
            {
                "config": args.child,
                "slots": plan.slots,
                "threads": plan.threads,
                "clicks": len(times),
                "seconds": round(wall, 2),
                "clicks_per_s": round(len(times) / wall, 2),
                "p50_ms": round(1000 * float(np.percentile(times, 50)), 1),
                "p95_ms": round(1000 * float(np.percentile(times, 95)), 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="1x2,2x1,1x1", help="comma-separated SxT: S slots of T threads")
    parser.add_argument("--seconds", type=float, default=40.0, help="clicking time of each configuration")
    parser.add_argument("--clients", type=int, default=4, help="threads sending clicks back to back")
    parser.add_argument("--objects", type=int, default=3, help="objects clicked per image, largest first")
    parser.add_argument("--clicks", type=int, default=5, help="most clicks per object")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        sys.stdout.flush()
        # The runtime's background thread may still be completing an image's features: do not wait for it.
        os._exit(0)
    configs = args.configs.split(",")
    for config in configs:
        parse_config(config)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SEGMASK_REDIS_URL")}
    rows = []
    for config in configs:
        print(f"{config}: {args.seconds:.0f} s of clicks from {args.clients} clients ...", flush=True)
        command = [sys.executable, __file__, "--child", config, "--seconds", str(args.seconds)]
        command += [
            "--clients",
            str(args.clients),
            "--objects",
            str(args.objects),
            "--clicks",
            str(args.clicks),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{config} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]["clicks_per_s"]
    header = ["slots x threads", "clicks", "clicks/s", "p50 ms", "p95 ms", f"vs {configs[0]}"]
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(header, (16, 7, 9, 7, 7, 9), strict=True)))
    for row in rows:
        row["ratio"] = round(row["clicks_per_s"] / base, 2) if base else None
        print(
            f"{row['config']:>16} {row['clicks']:>7} {row['clicks_per_s']:>9.2f} {row['p50_ms']:>7.0f} "
            f"{row['p95_ms']:>7.0f} {row['ratio']:>9.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "rows": rows,
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
