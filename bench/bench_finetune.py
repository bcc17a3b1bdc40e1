"""What a retraining job costs and gains: fine-tune the shipped model on 20 annotated images, then old vs new
on held-out images, as the job does before publishing.

The project (simulated from COCO128): labels ``person, car, chair, cup, puppy``, where ``puppy`` is what
this project calls COCO's dogs (a label the shipped model has never seen; the other four it knows). The 20
"accepted" images are the train-split images (``image_id % 5 != 0``) with the most instances of those
classes; the held-out images are the val split (``% 5 == 0``) with any of them. ``segmodels.finetune`` runs
with its default configuration (what ``backend/training.py`` uses), timed end to end with its progress
bar; ``compare`` then gives one-click mIoU and label top-1 (by name) of the shipped and the fine-tuned
model on the held-out images.

Caveat: the shipped DeepMask/SharpMask were trained on the train split, so these 20 images teach the mask
stages nothing new; click mIoU shows whether fine-tuning hurts masks. The label gain is real for ``puppy``
and shows how quickly the other labels are relearned by a project-sized classifier.
Prints a table and writes ``bench/results/finetune.json``::

    .venv/bin/python bench/bench_finetune.py [--images 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from backend.allocator import ensure_allocator_env
from backend.settings import DEFAULT_DATA_DIR
from segmodels.finetune import FinetuneConfig, compare, finetune
from segmodels.predictor import DEFAULT_CHECKPOINT
from segmodels.splits import in_split

REPO = Path(__file__).resolve().parents[1]
DATA = DEFAULT_DATA_DIR
OUT = REPO / "bench" / "results" / "finetune.json"
PROJECT = {"person": "person", "car": "car", "chair": "chair", "cup": "cup", "dog": "puppy"}


def project_dataset(root: Path, n_images: int) -> tuple[Path, list[int], list[int]]:
    """The simulated project's COCO directory (images linked), its fine-tune and held-out image ids."""
    coco = json.loads((DATA / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    labels = list(PROJECT.values())
    anns = [a for a in coco["annotations"] if names[a["category_id"]] in PROJECT and not a["iscrowd"]]
    for a in anns:
        a["category_id"] = labels.index(PROJECT[names[a["category_id"]]]) + 1
    counts = Counter(a["image_id"] for a in anns)
    train = sorted((i for i in counts if in_split(i, "train")), key=lambda i: (-counts[i], i))[:n_images]
    heldout = sorted(i for i in counts if in_split(i, "val"))
    keep = set(train) | set(heldout)
    subset = {
        "images": [im for im in coco["images"] if im["id"] in keep],
        "annotations": [a for a in anns if a["image_id"] in keep],
        "categories": [{"id": n + 1, "name": name} for n, name in enumerate(labels)],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "instances.json").write_text(json.dumps(subset))
    (root / "images").symlink_to(DATA / "images")
    return root, sorted(train), heldout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, train, heldout = project_dataset(Path(tmp) / "project", args.images)
        cfg = FinetuneConfig()
        started = time.perf_counter()
        finetune(DEFAULT_CHECKPOINT, data, Path(tmp) / "new", cfg, train_image_ids=train)
        seconds = time.perf_counter() - started
        result = compare(DEFAULT_CHECKPOINT, Path(tmp) / "new", data, heldout)
    old, new = result["old"], result["new"]
    print(f"\nfine-tune on {len(train)} images: {seconds:.1f} s (target <= 120 s on 2 CPU cores)")
    print(f"held-out: {result['n_images']} images, {result['n_instances']} instances")
    print(f"{'model':<12} {'click mIoU':>11} {'label top-1':>12}")
    for name, row in (("shipped", old), ("fine-tuned", new)):
        print(f"{name:<12} {row['click_miou']:>11.3f} {row['label_top1']:>12.3f}")
    print(f"publish? {result['better_or_equal']} ({result.get('reason', '')})")
    record = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "project_labels": PROJECT,
        "train_image_ids": train,
        "heldout_image_ids": heldout,
        "finetune_seconds": seconds,
        "config": cfg.__dict__,
        "compare": result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    ensure_allocator_env()
    main()
