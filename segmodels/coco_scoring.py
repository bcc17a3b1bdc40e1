"""COCO scoring with pycocotools: a ground-truth ``COCO`` object of some images of a dataset, class-agnostic
AR of proposals (``useCats = 0``, maxDets :data:`MAX_DETS`) and AP of labelled detections (``useCats = 1``,
COCO's default maxDets), each for ``segm`` (RLE masks) and ``bbox`` (COCO ``[x, y, w, h]`` pixels).

Results are COCO result dicts (``image_id``, ``category_id``, ``score`` and ``segmentation`` and/or ``bbox``);
stats are named as in :data:`COCO_STATS` and :data:`DETECTION_STATS` (-1 where the GT has no instance of a
size).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segmodels.data import CocoInstances

log = logging.getLogger(__name__)

# pycocotools trips this numpy 2 DeprecationWarning on every decode.
NUMPY2_WARNING = "__array__ implementation doesn't accept a copy keyword"
# Class-agnostic runs (proposals): maxDets and the names of COCOeval's 12 stats.
MAX_DETS = (10, 100, 1000)
AP_STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
COCO_STATS = (
    *AP_STATS,
    *(f"AR@{d}" for d in MAX_DETS),
    *(f"AR_{s}@{MAX_DETS[-1]}" for s in ("small", "medium", "large")),
)
# Runs with categories (detections): COCO's default maxDets (1, 10, 100).
DETECTION_STATS = (
    *AP_STATS,
    "AR@1",
    "AR@10",
    "AR@100",
    "AR_small@100",
    "AR_medium@100",
    "AR_large@100",
)


def coco_ground_truth(dataset: CocoInstances, image_indices: Sequence[int]) -> COCO:
    """A pycocotools COCO object of the images' annotations: all categories, crowd flags as they are."""
    ids = {dataset.images[i]["id"] for i in image_indices}
    coco = COCO()
    coco.dataset = {
        "images": [dataset.images[i] for i in image_indices],
        "annotations": [a for a in dataset.annotations if a["image_id"] in ids],
        "categories": [{"id": c, "name": n} for c, n in dataset.categories.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_stats(
    gt: COCO, results: list[dict], iou_type: str, names: Sequence[str], use_cats: bool = True
) -> dict[str, float]:
    """COCOeval of ``results`` over all of ``gt``'s images: its summary stats under ``names``. Class-agnostic
    runs use maxDets :data:`MAX_DETS`, the others COCO's defaults (1/10/100)."""
    printed = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.filterwarnings("ignore", message=NUMPY2_WARNING)
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        if not use_cats:
            evaluator.params.useCats = 0
            evaluator.params.maxDets = list(MAX_DETS)
        evaluator.params.imgIds = sorted(gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("COCOeval %s (categories: %s):\n%s", iou_type, use_cats, printed.getvalue())
    return dict(zip(names, (float(v) for v in evaluator.stats), strict=True))


def average_recall(gt: COCO, segm: list[dict], bbox: list[dict]) -> dict[str, dict[str, float]]:
    """COCOeval stats (names in :data:`COCO_STATS`; -1 where no GT of a size) per iou type, class-agnostic,
    maxDets :data:`MAX_DETS`, over all of ``gt``'s images. Both result lists must be non-empty."""
    return {
        iou_type: coco_stats(gt, results, iou_type, COCO_STATS, use_cats=False)
        for iou_type, results in (("segm", segm), ("bbox", bbox))
    }


def detection_ap(gt: COCO, results: list[dict]) -> dict[str, dict[str, float]]:
    """COCOeval with categories (``useCats = 1``, default maxDets 1/10/100) of COCO detection results
    (:func:`segmodels.export.detections_to_coco`) over all of ``gt``'s images, ``segm`` and ``bbox``:
    stats named :data:`DETECTION_STATS` (-1 where ``gt`` has no instance of a size).

    ``segm`` evaluates copies without ``bbox``, so that ``loadRes`` takes each result's area (COCO's size
    ranges) from its mask; ``bbox`` copies without ``segmentation``. No result at all scores 0.
    """
    if not results:
        return {t: dict.fromkeys(DETECTION_STATS, 0.0) for t in ("segm", "bbox")}
    return {
        iou_type: coco_stats(
            gt, [{k: v for k, v in r.items() if k != drop} for r in results], iou_type, DETECTION_STATS
        )
        for iou_type, drop in (("segm", "bbox"), ("bbox", "segmentation"))
    }
