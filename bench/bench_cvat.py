"""Click latency of the CVAT nuclio interactor on CPU, next to the Label Studio backend's in-process click.

Same images and clicks as bench_http.py: ``--images`` held-out COCO128 images (image_id % 5 == 0), on each a
first click (a new image: base64 + JPEG decode, content hash, trunk) and ``--repeats`` further clicks on the
same image (features cached by content hash), cycling over its objects largest first, clicking each one's
interior point farthest from its boundary.

- ``nuclio interactor``: ``backend/cvat/nuclio/interactor/main.py``'s handler run by nuclio-sdk's test
  platform on CVAT's request body (``{"image": base64, "pos_points", "neg_points", "obj_bbox"}``), response
  JSON-encoded (what the function does per request; nuclio's HTTP hop is not included);
- ``label studio in-process``: ``backend.runtime.Runtime.segment`` on the same click (local-files image).

Prints a table (p50/p95/min ms) and writes JSON. A benchmark, never a pass/fail test::

    .venv/bin/python bench/bench_cvat.py [--images 8] [--repeats 10] [--out bench/results/cvat.json]
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from bench_http import DATA, objects_of, percentile
from nuclio_sdk import Event
from nuclio_sdk.test import Platform

from backend.runtime import Runtime
from backend.settings import Settings
from segmodels.annotator import click_point
from segmodels.splits import in_split

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "cvat.json"
PATHS = ("nuclio interactor", "label studio in-process")


def load_interactor():
    """The nuclio interactor's handler, imported as nuclio does (its own top-level module)."""
    path = REPO / "backend" / "cvat" / "nuclio" / "interactor" / "main.py"
    spec = importlib.util.spec_from_file_location("segmask_nuclio_interactor", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.handler


def ls_request(image: dict, x: float, y: float) -> dict:
    """The job the Label Studio backend runs for a keypoint click at pixel (x, y) (cf. bench_http)."""
    return {
        "image": {"url": f"/data/local-files/?d={image['file_name']}", "project": ""},
        "prompt": {
            "points": [[x / image["width"] * 100, y / image["height"] * 100]],
            "positive": [True],
            "box": None,
        },
        "output": "polygon",
    }


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def summarise(samples: dict[str, dict[str, list[float]]]) -> dict:
    return {
        path: {
            kind: {
                "n": len(v),
                **{f"p{q}_ms": percentile(v, q) for q in (50, 95)},
                "min_ms": percentile(v, 0),
            }
            for kind, v in kinds.items()
        }
        for path, kinds in samples.items()
    }


def print_table(summary: dict) -> None:
    print(f"\n{'path':<24} {'clicks':<9} {'n':>4} {'p50 ms':>9} {'p95 ms':>9} {'min ms':>9}")
    for path, kinds in summary.items():
        for kind, row in kinds.items():
            print(
                f"{path:<24} {kind:<9} {row['n']:>4} {row['p50_ms']:>9.1f} {row['p95_ms']:>9.1f} "
                f"{row['min_ms']:>9.1f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8, help="held-out images (first by id)")
    parser.add_argument("--repeats", type=int, default=10, help="repeated clicks per image")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("SEGMASK_DEVICE", "cpu")

    coco = json.loads((DATA / "instances.json").read_text())
    images = [im for im in sorted(coco["images"], key=lambda im: im["id"]) if in_split(im["id"], "val")]
    images = [im for im in images if objects_of(im, coco)][: args.images]

    nuclio, handler = Platform(), load_interactor()
    runtime = Runtime(Settings.from_env({}, device="cpu", local_files_root=str(DATA / "images")))
    samples: dict[str, dict[str, list[float]]] = {p: {"first": [], "repeated": []} for p in PATHS}
    for image in images:
        image_b64 = base64.b64encode((DATA / "images" / image["file_name"]).read_bytes()).decode()
        masks = objects_of(image, coco)
        clicks = [click_point(masks[k % len(masks)]) for k in range(args.repeats + 1)]
        for k, (x, y) in enumerate(clicks):
            kind = "first" if k == 0 else "repeated"
            body = {"image": image_b64, "pos_points": [[x, y]], "neg_points": [], "obj_bbox": []}
            response = None

            def call_nuclio(body=body) -> None:
                nonlocal response
                response = nuclio.call_handler(handler, Event(body=body))

            samples["nuclio interactor"][kind].append(timed(call_nuclio))
            assert response.status_code == 200, response.body
            request = ls_request(image, x, y)
            samples["label studio in-process"][kind].append(timed(lambda r=request: runtime.segment(r)))
        print(f"{image['file_name']}: first click {samples['nuclio interactor']['first'][-1] * 1000:.0f} ms")

    summary = summarise(samples)
    print_table(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                },
                "images": [im["file_name"] for im in images],
                "repeats": args.repeats,
                "summary": summary,
                "samples_s": samples,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
