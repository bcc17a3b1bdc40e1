"""The fixed split of a COCO dataset by image id, which every reported number uses (no PyTorch, no numpy:
the serving layer applies the same rule to Label Studio task ids)."""

from __future__ import annotations

SPLITS = ("train", "val", "all", "tune", "fit", "tune2", "fit2")


def in_split(image_id: int, split: str) -> bool:
    """The documented split by image id: ``val`` (the test split) holds ``image_id % 5 == 0`` and ``train``
    the rest; ``train`` divides into ``tune`` (``image_id % 5 == 1``, where settings and models are chosen)
    and ``fit`` (what a model is trained on while they are being chosen). ``tune2`` (``image_id % 5 == 2``)
    and ``fit2`` (the other train images) are a second such fold, to check a choice made on the first."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    fold = image_id % 5
    return {
        "all": True,
        "val": fold == 0,
        "train": fold != 0,
        "tune": fold == 1,
        "fit": fold > 1,
        "tune2": fold == 2,
        "fit2": fold in (1, 3, 4),
    }[split]
