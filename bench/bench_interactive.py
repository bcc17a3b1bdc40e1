"""Interactive quality of predictor variants, side by side on one split (the tune split by default: settings
are chosen there, and the test split is reported once, by ``segmask evaluate``).

Every variant runs the simulated annotator of ``segmask evaluate`` (segmodels/annotator.py, the RITM
protocol) on the split's instances (non-crowd, area > 32^2 px): clicks alone, and the tight GT box followed
by corrective clicks, at most 20 interactions each. Variants (``--variants`` picks some):

- ``shipped``: the checkpoint without a click head (``--before``, default: the shipped model), its box path
  as before the click head (threshold 0.5);
- ``box threshold 0.2``: the same checkpoint with the box threshold of the defaults;
- ``click head``: the checkpoint with a click head (``--after``), all defaults;
- ``click head: as the last release``: one click-head step on a first click, no GrabCut for a box;
- ``click head: first click unrefined`` / ``1 step``: the first click's mask straight from the DeepMask
  window / after one step of the click head (the default takes two, each zoomed on the mask before it);
- ``click head: first click 1.6x context``, ``click head: first click 1.3x context``: the first click's
  first step sees a zoom window 1.6x (1.3x) wider than the window mask's;
- ``click head: corrections 2 steps``: two steps of the click head for every corrective click;
- ``click head: first click by the click head``: the click head takes a first click's steps even when the
  checkpoint has a first-click head (``segmask train first-click``);
- ``click head: box threshold 0.5``: the box threshold as before;
- ``click head: three box zooms``: box windows at 0.8, 1 and 1.25 of the canonical scale, the one whose
  mask's tight box fits the box best;
- ``click head: box fallback 0.7``: the filled box when the mask's tight box fits the box by IoU < 0.7;
- ``click head: box unrefined``: the box's DeepMask mask as it is: no step of the click head over the whole
  box (the default takes one, kept when its mask's tight box fits the box at least as well), no GrabCut;
- ``click head: box refined without fit check``: the refined box mask whether or not it fits the box better;
- ``click head: box 2 steps``: up to two refining steps, each kept when it fits the box at least as well;
- ``click head: box without GrabCut``: the box's mask without GrabCut's last step (the default lets
  GrabCut seeded by the mask decide its boundary inside the box, segmodels/grabcut_refine.py).

Prints a table (mIoU@1/@3/@5 with standard errors, NoC@85/@90, never reaching 0.85, box mIoU, box then
clicks) and writes ``bench/results/interactive-SPLIT.json``::

    .venv/bin/python bench/bench_interactive.py --after runs/clicks-fit [--split tune] [--max-images N]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from backend.settings import DEFAULT_DATA_DIR
from segmodels.data import CocoInstances
from segmodels.eval_interactive import convergence, evaluate_instances, summarise
from segmodels.eval_report import format_table
from segmodels.predictor import DEFAULT_CHECKPOINT, load_predictor

REPO = Path(__file__).resolve().parents[1]


def variants(before: Path, after: Path) -> dict[str, tuple[Path, dict]]:
    """``{name: (checkpoint, predictor keyword arguments)}``."""
    return {
        "shipped": (before, {"box_threshold": 0.5}),
        "box threshold 0.2": (before, {}),
        "click head": (after, {}),
        "click head: as the last release": (after, {"first_click_steps": 1, "box_grabcut": False}),
        "click head: first click unrefined": (after, {"first_click_steps": 0}),
        "click head: first click 1 step": (after, {"first_click_steps": 1}),
        "click head: first click 1.6x context": (after, {"first_click_context": 1.6}),
        "click head: first click 1.3x context": (after, {"first_click_context": 1.3}),
        "click head: corrections 2 steps": (after, {"correction_steps": 2}),
        "click head: flip-averaged": (after, {"flip_average": True}),
        "click head: first click by the click head": (after, {"first_click_head": False}),
        "click head: box threshold 0.5": (after, {"box_threshold": 0.5}),
        "click head: three box zooms": (after, {"box_zooms": (0.8, 1.0, 1.25)}),
        "click head: box fallback 0.7": (after, {"box_min_fit": 0.7}),
        "click head: box unrefined": (after, {"box_steps": 0, "box_grabcut": False}),
        "click head: box refined without fit check": (after, {"box_fit_check": False}),
        "click head: box 2 steps": (after, {"box_steps": 2}),
        "click head: box without GrabCut": (after, {"box_grabcut": False}),
    }


def measure(checkpoint: Path, kwargs: dict, dataset: CocoInstances, indices: list[int]) -> dict:
    predictor = load_predictor(checkpoint, **kwargs)
    start = time.perf_counter()
    results, _ = evaluate_instances(predictor, dataset, indices, {"clicks", "box"})
    return {
        "checkpoint": str(checkpoint),
        "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "seconds": time.perf_counter() - start,
        "summary": summarise(results),
        "convergence": convergence(results),
        # per object, for paired differences between variants
        "objects": [
            {"annotation_id": r.annotation_id, "click_ious": r.click_ious, "box_ious": r.box_ious}
            for r in results
        ],
    }


def row(name: str, m: dict) -> list[str]:
    clicks, box = m["convergence"]["clicks"]["all"], m["convergence"]["box + clicks"]["all"]

    def f(v: float | None, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    return [
        name,
        str(clicks["n"]),
        *(f"{f(clicks[f'miou@{k}'])}±{f(clicks[f'se@{k}'])}" for k in (1, 3, 5)),
        f(clicks["noc@0.85"], 2),
        f(clicks["noc@0.9"], 2),
        f(clicks["never@0.85"]),
        f"{f(box['miou@1'])}±{f(box['se@1'])}",
        f(box["miou@3"]),
        f(box["noc@0.85"], 2),
        f(box["never@0.85"]),
    ]


HEADERS = [
    "variant",
    "n",
    "mIoU@1",
    "mIoU@3",
    "mIoU@5",
    "NoC@85",
    "NoC@90",
    "never 85",
    "box mIoU",
    "box+2",
    "box NoC@85",
    "box never 85",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--split", default="tune")
    parser.add_argument("--before", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--after", type=Path, required=True, help="a checkpoint with a click head")
    parser.add_argument("--variants", help="comma-separated names (default: all; no name holds a comma)")
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dataset = CocoInstances(args.data, args.split)
    indices = sorted(range(len(dataset)), key=lambda i: dataset.images[i]["id"])[: args.max_images]
    chosen = variants(args.before, args.after)
    if args.variants:
        chosen = {k: chosen[k] for k in args.variants.split(",")}
    measured = {}
    for name, (checkpoint, kwargs) in chosen.items():
        measured[name] = measure(checkpoint, kwargs, dataset, indices)
        logging.info("%s", "  ".join(row(name, measured[name])))
    print(f"split {args.split}, {len(indices)} images; mIoU ± standard error")
    print(format_table(HEADERS, [row(name, m) for name, m in measured.items()]))
    out = args.out or REPO / "bench" / "results" / f"interactive-{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "bench/bench_interactive.py",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "split": args.split,
        "image_ids": [dataset.images[i]["id"] for i in indices],
        "variants": measured,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
