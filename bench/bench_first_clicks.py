"""First clicks on the objects of new images: the trunk on blocks (as the server does) against the trunk over
the whole pyramid first.

For each image with at least ``--objects`` annotated objects (area > 32^2 px) of the split, a first click
(the interior point farthest from the boundary, a new prompt each) on each of its ``--objects`` largest
objects, in turn, on new features of the image, three ways:

- ``whole pyramid``: ``compute_features(image)`` (the trunk over every level, timed as ``features``), then
  the clicks: what the server did before block trunks, and what it does after a warm-up on task open;
- ``blocks, back to back``: ``compute_features(image, trunk=False)``, then the clicks with no pause: the
  first runs the trunk on a block of each level, the second completes the levels it needs itself;
- ``blocks, completed between``: the same, with the levels completed (untimed) after the first click, as the
  server's background thread does in the annotator's time before the next click.

ONNX Runtime trunk and float16 features (the server's defaults on a CPU), glibc allocator settings of the
segmask commands. Prints medians per click and of the sum, and the IoU of each image's first mask from
blocks with the whole pyramid's (``--block-margin`` tries another context than
segmodels.predictor.BLOCK_MARGIN); writes JSON. A benchmark, never a pass/fail test::

    .venv/bin/python bench/bench_first_clicks.py [--split tune] [--objects 3] [--images 8] [--block-margin 96]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import segmodels.predictor as predictor_module
from backend.allocator import ensure_allocator_env
from backend.settings import DEFAULT_DATA_DIR
from segmodels.annotator import click_point
from segmodels.data import CocoInstances
from segmodels.eval_report import format_table
from segmodels.geometry import mask_iou
from segmodels.predictor import DEFAULT_CHECKPOINT, MaskPredictor, load_predictor

REPO = Path(__file__).resolve().parents[1]
WAYS = ("whole pyramid", "blocks, back to back", "blocks, completed between")


def first_clicks(
    predictor: MaskPredictor, image: np.ndarray, points: list, way: str
) -> tuple[list[float], list[np.ndarray]]:
    """Milliseconds of the features, then of each first click, on new features of ``image``; the masks."""
    start = time.perf_counter()
    predictor.set_image(image, trunk=way == WAYS[0])
    times, masks = [(time.perf_counter() - start) * 1e3], []
    for n, point in enumerate(points):
        start = time.perf_counter()
        masks.append(predictor.segment(points=[point], point_labels=[1]).mask)
        times.append((time.perf_counter() - start) * 1e3)
        if n == 0 and way == WAYS[2]:
            predictor.complete_levels()
    return times, masks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--split", default="tune")
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--block-margin", type=int, default=predictor_module.BLOCK_MARGIN)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "first-clicks.json")
    args = parser.parse_args()
    ensure_allocator_env()  # as every segmask command runs (backend.allocator)
    predictor_module.BLOCK_MARGIN = args.block_margin
    dataset = CocoInstances(args.data, args.split)
    predictor = load_predictor(args.checkpoint, trunk_engine="onnxruntime", feature_dtype=torch.float16)
    scenes = []
    for index in range(len(dataset)):
        objects = sorted(
            (inst for inst in dataset.instances_by_image[index] if inst.area > 32 * 32), key=lambda i: -i.area
        )
        if len(objects) >= args.objects:
            scenes.append((index, [click_point(dataset.mask(inst)) for inst in objects[: args.objects]]))
    scenes = scenes[: args.images]
    first_clicks(predictor, dataset.image(scenes[0][0]), scenes[0][1], WAYS[0])  # warm-up
    samples: dict[str, list[list[float]]] = {way: [] for way in WAYS}
    block_ious = []  # each object's first-click mask from a block against the whole pyramid's
    for index, points in tqdm(scenes, desc="images", unit="image"):
        image = dataset.image(index)
        masks = {}
        for way in WAYS:  # interleaved, so background load hits them alike
            times, masks[way] = first_clicks(predictor, image, points, way)
            samples[way].append(times)
        block_ious.append(mask_iou(masks[WAYS[1]][0], masks[WAYS[0]][0]))
    medians = {way: np.median(np.array(rows), axis=0).tolist() for way, rows in samples.items()}
    totals = {way: float(np.median(np.array(rows).sum(axis=1))) for way, rows in samples.items()}
    header = ["way", "features ms", *(f"object {n + 1} ms" for n in range(args.objects)), "sum ms"]
    print(f"{len(scenes)} {args.split} images, first clicks on {args.objects} objects each (medians)")
    print(
        format_table(
            header, [[way, *(f"{v:.0f}" for v in medians[way]), f"{totals[way]:.0f}"] for way in WAYS]
        )
    )
    ious = np.array(block_ious)
    print(f"first object's mask, blocks vs whole pyramid: IoU mean {ious.mean():.5f}, min {ious.min():.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": platform.platform(),
                "torch_threads": torch.get_num_threads(),
                "split": args.split,
                "block_margin": args.block_margin,
                "images": [dataset.images[i]["id"] for i, _ in scenes],
                "median_ms": medians,
                "median_sum_ms": totals,
                "block_vs_whole_iou": block_ious,
                "samples_ms": samples,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
