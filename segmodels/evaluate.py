"""``segmask evaluate``: interactive and proposal quality of a checkpoint on a split of a COCO-format dataset.

The protocol of docs/targets.md and docs/papers.md, measured on the split's images (``data.in_split``):

- instances: non-crowd annotations with COCO ``area`` > 32^2 px, masks rasterised as COCO does
  (``geometry.coco_segmentation_to_mask``); sizes as COCO: medium 32^2..96^2, large > 96^2;
- click-to-mask: the simulated annotator of interactive segmentation (annotator.py, the RITM protocol): one
  positive click at the interior point farthest from the GT boundary, then up to 19 corrective clicks, each
  at the point farthest from the boundary of the larger error region (a missed part gets a positive click, a
  spurious part a negative one); every call passes all the clicks so far. Reported: mIoU after 1, 2, 3, 5
  and 10 clicks with standard errors, NoC@85 and NoC@90 (clicks to reach the IoU, 20 when never reached),
  and the share of objects that never reach 0.85 in 20 clicks;
- box-to-mask: the tight GT box as the prompt, then the same corrective clicks (the box counts as the first
  interaction);
- baselines on the same instances: the filled GT box, and OpenCV GrabCut (5 iterations from the tight box);
- proposals: class-agnostic AR@10/100/1000 (pycocotools, ``segm`` and ``bbox``, ``useCats = 0``) of the
  top-k windows of ``MaskPredictor.propose``, against all of the images' annotations (crowd flags as COCO);
- patches: the papers' evalPerPatch, mean mask IoU and success@.5/.7 on fixed-seed jittered windows;
- labels (checkpoints with a MultiPathNet): top-1 accuracy of ``MaskPredictor.classify`` on every evaluated
  instance's GT mask and its tight box (argmax over the foreground classes), per frequent class with its most
  common confusion, and once more over all non-crowd instances whatever their size;
- detection (same): COCO AP of ``MaskPredictor.detect`` (score threshold 0, at most 100 per image) with
  categories (``useCats = 1``, default maxDets), ``segm`` (RLE masks) and ``bbox`` (MultiPathNet's boxes);
  and what pre-annotation shows at detect()'s default threshold per cap on detections per image: precision
  and recall.

Coordinates follow geometry.py: images ``(H, W, 3) uint8 RGB``, masks ``bool (H, W)``, points ``(x, y)`` in
pixel edge coordinates (pixel (row r, column c) has its centre at ``(c + 0.5, r + 0.5)``), boxes float
``[x1, y1, x2, y2]`` with exclusive right/bottom edges.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from segmodels.annotator import click_point, next_click
from segmodels.data import CocoInstances, Instance, WindowSampler
from segmodels.device import to_device
from segmodels.export import detections_to_coco, draw_detections
from segmodels.geometry import (
    coco_segmentation_to_mask,
    mask_iou,
    mask_to_box,
    mask_to_rle,
    masks_iou_matrix,
    rle_to_mask,
)
from segmodels.predictor import (
    DEFAULT_CHECKPOINT,
    PREANNOTATION_MAX,
    PREANNOTATION_THRESHOLD,
    Detection,
    Mask,
    MaskPredictor,
    box_mask,
    load_predictor,
)
from segmodels.train import batch_iou, mask_logits

log = logging.getLogger(__name__)

PARTS = ("clicks", "box", "baselines", "proposals", "patches", "labels", "detection")
# The parts that need the checkpoint's MultiPathNet (skipped with a note without one).
LABEL_PARTS = ("labels", "detection")
MIN_AREA = 32**2
LARGE_AREA = 96**2
SIZES = ("all", "medium", "large")
THRESHOLDS = (0.5, 0.75, 0.85)
# Interactions per object (a box or the first click, then corrections), and those reported.
MAX_CLICKS = 20
REPORTED_CLICKS = (1, 2, 3, 5, 10)
NOC_THRESHOLDS = (0.85, 0.9)
SEQUENCES = ("clicks", "box + clicks")
GRABCUT_ITERATIONS = 5
MAX_DETS = (10, 100, 1000)
AP_STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
COCO_STATS = (
    *AP_STATS,
    *(f"AR@{d}" for d in MAX_DETS),
    *(f"AR_{s}@{MAX_DETS[-1]}" for s in ("small", "medium", "large")),
)
# The same windows as training's Validation (seed 10_000 + train seed 0), continued to n windows.
PATCH_SEED = 10_000
PATCH_THRESHOLDS = (0.5, 0.7)
PATCH_BATCH = 32
# pycocotools trips this numpy 2 DeprecationWarning on every decode.
NUMPY2_WARNING = "__array__ implementation doesn't accept a copy keyword"
EXAMPLES_PER_GROUP = 4
# The click-sequence figure: objects shown, and after how many clicks.
SEQUENCE_EXAMPLES = 4
SEQUENCE_STEPS = (1, 2, 3, 5, 10)
PROPOSAL_IMAGES = 3
TOP_PROPOSALS = 10
# Labels: classes with at least this many evaluated instances get a row of their own.
FREQUENT_CLASS = 3
# Detection: AP over every detection (threshold 0), COCO's default maxDets (1, 10, 100).
DETECTION_THRESHOLD = 0.0
DETECTION_MAX = 100
# Detections per image at which pre-annotation precision and recall are reported (with detect()'s default),
# to choose SEGMASK_MAX_DETECTIONS from.
PRECISION_CAPS = (1, 2, 3, 5, 10)
DETECTION_STATS = (
    *AP_STATS,
    "AR@1",
    "AR@10",
    "AR@100",
    "AR_small@100",
    "AR_medium@100",
    "AR_large@100",
)
DETECTION_IMAGES = 4


@dataclass
class InstanceResult:
    """One evaluated GT instance; a method's fields stay None (or empty) when it was skipped.

    ``box``: the tight GT box ``[x1, y1, x2, y2]``. ``clicks``: ``[x, y, label]`` in order (label 1 positive,
    0 negative). ``click_ious[k]``: IoU after ``k + 1`` clicks; when a mask is already perfect no further
    click is made and its IoU is carried on, so ``click_seconds`` (one per predictor call) can be shorter.
    ``box_clicks``, ``box_ious``: the same after the box prompt (``box_ious[0]`` = ``box_iou``: the box
    alone).
    ``grabcut_fallback``: GrabCut had no background to model (the box is the whole image) and the filled box
    stands in. ``masks``: RLE of the one-click and box predictions, for the figures (not saved).
    """

    image_id: int
    annotation_id: int
    category_id: int
    area: float
    size: str
    box: list[float]
    clicks: list[list[float]] = field(default_factory=list)
    click_ious: list[float] = field(default_factory=list)
    click_seconds: list[float] = field(default_factory=list)
    box_iou: float | None = None
    box_seconds: float | None = None
    box_clicks: list[list[float]] = field(default_factory=list)
    box_ious: list[float] = field(default_factory=list)
    filled_box_iou: float | None = None
    grabcut_iou: float | None = None
    grabcut_seconds: float | None = None
    grabcut_fallback: bool = False
    masks: dict[str, dict] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "masks"}


# ---- baselines ----------------------------------------------------------------------------------------
def filled_box_mask(gt: np.ndarray) -> np.ndarray:
    """The baseline "filled GT box": every pixel of the tight box of ``gt`` (``(H, W)`` bool)."""
    return box_mask(mask_to_box(gt), *gt.shape, margin=0.0)


def grabcut_mask(image: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """OpenCV GrabCut from a rectangle: ``image (H, W, 3) uint8 RGB``, ``box`` xyxy pixels -> bool (H, W).

    ``GC_INIT_WITH_RECT``, :data:`GRABCUT_ITERATIONS` iterations; the mask is ``GC_FGD | GC_PR_FGD``. Returns
    None when the box leaves no background pixel to model (GrabCut refuses to start).
    """
    height, width = image.shape[:2]
    x1, y1 = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    x2, y2 = min(width, int(round(box[2]))), min(height, int(round(box[3])))
    if x1 == 0 and y1 == 0 and x2 == width and y2 == height:
        return None
    labels = np.zeros((height, width), np.uint8)
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    cv2.grabCut(
        bgr,
        labels,
        (x1, y1, max(1, x2 - x1), max(1, y2 - y1)),
        background,
        foreground,
        GRABCUT_ITERATIONS,
        cv2.GC_INIT_WITH_RECT,
    )
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


def size_of(area: float) -> str:
    """COCO size class of an instance area in px (the evaluated instances are never small)."""
    return "large" if area > LARGE_AREA else "medium"


# ---- interactive evaluation -----------------------------------------------------------------------------
def evaluate_clicks(
    predictor: MaskPredictor, gt: np.ndarray, box: np.ndarray | None = None, max_clicks: int = MAX_CLICKS
) -> tuple[list[list[float]], list[float], list[float], np.ndarray]:
    """The simulated annotator on the predictor's current image, for ``max_clicks`` interactions or until
    the mask is perfect. ``gt``: ``(H, W)`` bool. Without ``box`` the first interaction is a click at the
    GT's deepest point; with one (xyxy pixels) it is the box, and every later call passes it too.

    Returns the clicks ``[x, y, label]``, the IoU after each interaction (a perfect mask's carried on), the
    seconds of each ``segment`` call and the first interaction's mask.
    """
    points: list[tuple[float, float]] = [] if box is not None else [click_point(gt)]
    labels: list[int] = [] if box is not None else [1]
    ious: list[float] = []
    seconds: list[float] = []
    first: np.ndarray | None = None
    while True:
        start = time.perf_counter()
        pred = predictor.segment(points=points or None, labels=labels or None, box=box).mask
        seconds.append(time.perf_counter() - start)
        ious.append(mask_iou(pred, gt))
        first = pred if first is None else first
        if len(ious) == max_clicks:
            break
        correction = next_click(pred, gt)
        if correction is None:
            ious += [ious[-1]] * (max_clicks - len(ious))
            break
        points.append(correction[0])
        labels.append(correction[1])
    clicks = [[x, y, float(label)] for (x, y), label in zip(points, labels, strict=True)]
    return clicks, ious, seconds, first


def evaluate_instances(
    predictor: MaskPredictor, dataset: CocoInstances, image_indices: Sequence[int], parts: set[str]
) -> tuple[list[InstanceResult], list[float]]:
    """Click, box and baseline results for every eligible instance of the images, in image order.

    ``parts`` holds the subset of ``clicks``, ``box``, ``baselines`` to run. Returns the results and the
    seconds of ``set_image`` (the per-image feature pass that clicks and boxes share) of each image.
    """
    results: list[InstanceResult] = []
    feature_seconds: list[float] = []
    for index in tqdm(image_indices, desc="instances", unit="image", dynamic_ncols=True):
        instances = [inst for inst in dataset.instances_by_image[index] if inst.area > MIN_AREA]
        if not instances:
            continue
        image = dataset.image(index)
        if parts & {"clicks", "box"}:
            start = time.perf_counter()
            predictor.set_image(image)
            feature_seconds.append(time.perf_counter() - start)
        for inst in instances:
            gt = dataset.mask(inst)
            box = mask_to_box(gt)
            result = InstanceResult(
                dataset.images[index]["id"],
                inst.annotation_id,
                inst.category_id,
                float(inst.area),
                size_of(inst.area),
                [float(v) for v in box],
            )
            if "clicks" in parts:
                result.clicks, result.click_ious, result.click_seconds, first = evaluate_clicks(predictor, gt)
                result.masks["click"] = mask_to_rle(first)
            if "box" in parts:
                result.box_clicks, result.box_ious, seconds, first = evaluate_clicks(predictor, gt, box)
                result.box_iou, result.box_seconds = result.box_ious[0], seconds[0]
                result.masks["box"] = mask_to_rle(first)
            if "baselines" in parts:
                filled = filled_box_mask(gt)
                result.filled_box_iou = mask_iou(filled, gt)
                start = time.perf_counter()
                grabcut = grabcut_mask(image, box)
                result.grabcut_seconds = time.perf_counter() - start
                result.grabcut_fallback = grabcut is None
                result.grabcut_iou = mask_iou(filled if grabcut is None else grabcut, gt)
            results.append(result)
    return results, feature_seconds


def method_scores(result: InstanceResult) -> dict[str, tuple[float, float | None]]:
    """``{method: (IoU, seconds or None)}`` of the methods evaluated on one instance."""
    out: dict[str, tuple[float, float | None]] = {}
    for k in REPORTED_CLICKS[: len(result.click_ious)]:
        seconds = result.click_seconds[k - 1] if k <= len(result.click_seconds) else None
        out[f"click@{k}"] = (result.click_ious[k - 1], seconds)
    if result.box_iou is not None:
        out["box"] = (result.box_iou, result.box_seconds)
    if result.filled_box_iou is not None:
        out["filled box"] = (result.filled_box_iou, None)
    if result.grabcut_iou is not None:
        out["grabcut"] = (result.grabcut_iou, result.grabcut_seconds)
    return out


def summarise(results: Iterable[InstanceResult]) -> dict[str, dict]:
    """Per method: mIoU and success rates (IoU >= each of :data:`THRESHOLDS`) for all/medium/large
    instances, and the median seconds per object (None for the filled box, which costs nothing).

    ``{method: {"median_seconds": s, "all": {"n", "miou", "success@0.5", ...}, "medium": {...}, "large":
    {...}}}``; a size with no instance has ``n = 0`` and None for the rates.
    """
    per_method: dict[str, list[tuple[str, float, float | None]]] = {}
    for result in results:
        for method, (iou, seconds) in method_scores(result).items():
            per_method.setdefault(method, []).append((result.size, iou, seconds))
    summary = {}
    for method, rows in per_method.items():
        times = [s for _, _, s in rows if s is not None]
        entry: dict = {"median_seconds": statistics.median(times) if times else None}
        for size in SIZES:
            ious = np.array([iou for sz, iou, _ in rows if size in ("all", sz)])
            entry[size] = {
                "n": len(ious),
                "miou": float(ious.mean()) if len(ious) else None,
                "se": standard_error(ious),
            }
            for t in THRESHOLDS:
                entry[size][f"success@{t}"] = float((ious >= t).mean()) if len(ious) else None
        summary[method] = entry
    return summary


# ---- proposals ------------------------------------------------------------------------------------------
def standard_error(values: np.ndarray) -> float | None:
    """Standard error of the mean of ``values`` (None for fewer than two)."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


def clicks_to_reach(ious: Sequence[float], threshold: float) -> int:
    """NoC: interactions until the IoU first reaches ``threshold``; ``len(ious)`` when it never does."""
    return next((k + 1 for k, iou in enumerate(ious) if iou >= threshold), len(ious))


def convergence(results: Iterable[InstanceResult]) -> dict[str, dict]:
    """Per sequence (:data:`SEQUENCES`: clicks alone, the box then clicks) and size: ``n``, mIoU and its
    standard error after each of :data:`REPORTED_CLICKS` interactions, mean NoC@85/@90 and the share of
    objects that never reach each threshold in :data:`MAX_CLICKS` interactions."""
    rows: dict[str, list[tuple[str, list[float]]]] = {name: [] for name in SEQUENCES}
    for r in results:
        rows["clicks"] += [(r.size, r.click_ious)] if r.click_ious else []
        rows["box + clicks"] += [(r.size, r.box_ious)] if r.box_ious else []
    out: dict[str, dict] = {}
    for name, entries in rows.items():
        if not entries:
            continue
        out[name] = {}
        for size in SIZES:
            curves = np.array([ious for sz, ious in entries if size in ("all", sz)])
            stats: dict = {"n": len(curves)}
            for k in REPORTED_CLICKS:
                column = curves[:, k - 1] if len(curves) else np.zeros(0)
                stats[f"miou@{k}"] = float(column.mean()) if len(column) else None
                stats[f"se@{k}"] = standard_error(column)
            for t in NOC_THRESHOLDS:
                noc = np.array([clicks_to_reach(c, t) for c in curves])
                never = np.array([max(c) < t for c in curves])
                stats[f"noc@{t}"] = float(noc.mean()) if len(noc) else None
                stats[f"never@{t}"] = float(never.mean()) if len(never) else None
            out[name][size] = stats
    return out


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


def proposal_results(
    image_id: int, proposals: Sequence[Mask], category_id: int
) -> tuple[list[dict], list[dict]]:
    """COCO result entries of one image's proposals: ``segm`` (RLE) and ``bbox`` (xywh of the mask's box).

    ``category_id`` is any GT category: the evaluation is class-agnostic.
    """
    segm, bbox = [], []
    for p in proposals:
        x1, y1, x2, y2 = (float(v) for v in p.box)
        common = {"image_id": image_id, "category_id": category_id, "score": float(p.score)}
        segm.append({**common, "segmentation": mask_to_rle(p.mask)})
        bbox.append({**common, "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return segm, bbox


def average_recall(gt: COCO, segm: list[dict], bbox: list[dict]) -> dict[str, dict[str, float]]:
    """COCOeval stats (names in :data:`COCO_STATS`; -1 where no GT of a size) per iou type, class-agnostic,
    maxDets :data:`MAX_DETS`, over all of ``gt``'s images. Both result lists must be non-empty."""
    return {
        iou_type: coco_stats(gt, results, iou_type, COCO_STATS, use_cats=False)
        for iou_type, results in (("segm", segm), ("bbox", bbox))
    }


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


def evaluate_proposals(
    predictor: MaskPredictor, dataset: CocoInstances, image_indices: Sequence[int], k: int
) -> tuple[dict, dict[int, list[tuple[dict, float]]]]:
    """AR of the top-``k`` proposals of each image (``set_image`` + ``propose(k)``, refined when the
    checkpoint has SharpMask). Returns the metrics and, for the first :data:`PROPOSAL_IMAGES` images with
    instances, their top :data:`TOP_PROPOSALS` proposals as ``(RLE, score)`` keyed by image index."""
    category_id = min(dataset.categories)
    segm: list[dict] = []
    bbox: list[dict] = []
    seconds: list[float] = []
    examples: dict[int, list[tuple[dict, float]]] = {}
    empty = 0
    for index in tqdm(image_indices, desc="proposals", unit="image", dynamic_ncols=True):
        image_id = dataset.images[index]["id"]
        start = time.perf_counter()
        predictor.set_image(dataset.image(index))
        proposals = predictor.propose(k=k)
        seconds.append(time.perf_counter() - start)
        empty += sum(not p.mask.any() for p in proposals)
        image_segm, image_bbox = proposal_results(image_id, proposals, category_id)
        segm += image_segm
        bbox += image_bbox
        if len(examples) < PROPOSAL_IMAGES and dataset.instances_by_image[index]:
            examples[index] = [(r["segmentation"], r["score"]) for r in image_segm[:TOP_PROPOSALS]]
    metrics = {
        "k": k,
        "images": len(image_indices),
        "empty_masks": empty,
        "median_seconds_per_image": statistics.median(seconds),
        **average_recall(coco_ground_truth(dataset, image_indices), segm, bbox),
    }
    return metrics, examples


# ---- labels ---------------------------------------------------------------------------------------------
@dataclass
class LabelResult:
    """MultiPathNet's label for one non-crowd GT instance, classified from its tight mask box.

    ``evaluated``: the instance passes the filter of the other parts (area > 32^2); the others count only in
    the all-sizes line. ``predicted_id``/``predicted``: the argmax over the foreground classes (dataset
    category id and name), ``probability`` its probability; ``gt_probability``: the probability of the true
    class, None when the checkpoint's label set does not have it (the instance can only be wrong).
    """

    image_id: int
    annotation_id: int
    category_id: int
    area: float
    evaluated: bool
    predicted_id: int
    predicted: str
    probability: float
    gt_probability: float | None

    @property
    def correct(self) -> bool:
        return self.predicted_id == self.category_id


def gt_box(annotation: dict, height: int, width: int) -> np.ndarray:
    """Tight xyxy box of an annotation's rasterised mask; its COCO ``bbox`` when the mask is empty (tiny
    polygons can cover no pixel centre)."""
    box = mask_to_box(coco_segmentation_to_mask(annotation["segmentation"], height, width))
    if box[2] > box[0] and box[3] > box[1]:
        return box
    x, y, w, h = annotation["bbox"]
    return np.array([x, y, x + max(w, 1.0), y + max(h, 1.0)], np.float32)


def gt_region(annotation: dict, box: np.ndarray, height: int, width: int) -> np.ndarray:
    """``bool (H, W)``: the annotation's mask, or its filled ``box`` (xyxy) when the mask covers no pixel."""
    mask = coco_segmentation_to_mask(annotation["segmentation"], height, width)
    return mask if mask.any() else box_mask(box, height, width, margin=0.0)


def evaluate_labels(
    predictor: MaskPredictor, dataset: CocoInstances, image_indices: Sequence[int]
) -> list[LabelResult]:
    """``classify`` the GT masks and tight boxes of every non-crowd annotation of the images (one call per
    image, after ``set_image``), in image order."""
    cfg = predictor.model.config
    column_of = {cid: n + 1 for n, cid in enumerate(cfg.class_ids)}
    evaluated = {
        inst.annotation_id for insts in dataset.instances_by_image for inst in insts if inst.area > MIN_AREA
    }
    by_image: dict[int, list[dict]] = {}
    for ann in dataset.annotations:
        if not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).append(ann)
    results: list[LabelResult] = []
    for index in tqdm(image_indices, desc="labels", unit="image", dynamic_ncols=True):
        info = dataset.images[index]
        anns = by_image.get(info["id"], [])
        if not anns:
            continue
        predictor.set_image(dataset.image(index))
        boxes = np.stack([gt_box(a, info["height"], info["width"]) for a in anns])
        masks = [gt_region(a, box, info["height"], info["width"]) for a, box in zip(anns, boxes, strict=True)]
        probs, _ = predictor.classify(boxes, masks)
        best = probs[:, 1:].argmax(axis=1)
        for ann, p, k in zip(anns, probs, best, strict=True):
            column = column_of.get(ann["category_id"])
            results.append(
                LabelResult(
                    info["id"],
                    ann["id"],
                    ann["category_id"],
                    float(ann["area"]),
                    ann["id"] in evaluated,
                    int(cfg.class_ids[k]),
                    cfg.classes[k],
                    float(p[k + 1]),
                    None if column is None else float(p[column]),
                )
            )
    return results


def label_summary(results: Sequence[LabelResult], names: dict[int, str]) -> dict:
    """Top-1 accuracy of the evaluated instances and of all of them, and a row per frequent class.

    ``names``: GT category id -> name. Returns ``{"n", "top1", "all_sizes": {"n", "top1"},
    "not_in_label_set", "per_class": [{"category_id", "name", "n", "top1", "confusion", "confusion_n"}]}``
    with the classes of at least :data:`FREQUENT_CLASS` evaluated instances, most instances first (then by
    name); ``confusion`` is the most common wrong label of the class (None when it has none). Rates are
    None without instances.
    """

    def top1(rows: Sequence[LabelResult]) -> float | None:
        return sum(r.correct for r in rows) / len(rows) if rows else None

    evaluated = [r for r in results if r.evaluated]
    per_category: dict[int, list[LabelResult]] = {}
    for r in evaluated:
        per_category.setdefault(r.category_id, []).append(r)
    per_class = []
    for category, rows in per_category.items():
        if len(rows) < FREQUENT_CLASS:
            continue
        wrong = Counter(r.predicted for r in rows if not r.correct).most_common(1)
        per_class.append(
            {
                "category_id": category,
                "name": names.get(category, str(category)),
                "n": len(rows),
                "top1": top1(rows),
                "confusion": wrong[0][0] if wrong else None,
                "confusion_n": wrong[0][1] if wrong else 0,
            }
        )
    per_class.sort(key=lambda c: (-c["n"], c["name"]))
    return {
        "n": len(evaluated),
        "top1": top1(evaluated),
        "all_sizes": {"n": len(results), "top1": top1(results)},
        "not_in_label_set": sum(r.gt_probability is None for r in evaluated),
        "per_class": per_class,
    }


# ---- detection ------------------------------------------------------------------------------------------
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


def match_detections(
    detections: Sequence[Detection], instances: Sequence[Instance], dataset: CocoInstances
) -> tuple[int, int, int]:
    """Greedy one-to-one matching, best detection first, of ``detections`` to the image's ``instances`` with a
    mask at mask IoU >= 0.5: ``(right label, any label, matched instances area > 32^2)``. The first two count
    detections, the last the larger instances found with the right label."""
    masked = [inst for inst in instances if inst.has_mask]
    if not detections or not masked:
        return 0, 0, 0
    gt = np.stack([dataset.mask(inst) for inst in masked])
    iou = masks_iou_matrix(np.stack([d.mask for d in detections]), gt)
    counts = []
    for same_label in (True, False):
        taken: set[int] = set()
        for row, det in zip(iou, detections, strict=True):
            order = [j for j in np.argsort(-row) if row[j] >= 0.5 and j not in taken]
            order = [j for j in order if not same_label or masked[j].category_id == det.class_id]
            if order:
                taken.add(order[0])
        counts.append(taken)
    right, any_label = counts
    return len(right), len(any_label), sum(masked[j].area > MIN_AREA for j in right)


PR_COLUMNS = ("precision", "mask_precision", "last_mask_precision", "recall")


def precision_recall(
    counts: np.ndarray, images: int, instances: int, fewer: np.ndarray | None = None
) -> dict[str, float | None]:
    """What an annotator sees with pre-annotation at one setting, from ``counts`` (detections shown, right,
    right whatever the label, instances found; :func:`match_detections`): detections per image, precision
    (mask IoU >= 0.5 with an unmatched instance of their label), the same whatever the label, and recall
    (over ``instances``, those with area > 32^2). ``fewer``: the counts of the next smaller setting, for the
    precision whatever the label of the detections this one adds (``last_mask_precision``)."""
    shown, right, any_label, found = (int(c) for c in counts)
    added = shown - int(fewer[0]) if fewer is not None else shown
    gained = any_label - int(fewer[2]) if fewer is not None else any_label
    return {
        "per_image": shown / images if images else 0.0,
        "precision": right / shown if shown else None,
        "mask_precision": any_label / shown if shown else None,
        "last_mask_precision": gained / added if added else None,
        "recall": found / instances if instances else None,
    }


def count_caps(
    counts: dict[int, np.ndarray], shown: Sequence[Detection], instances: Sequence[Instance], dataset
) -> None:
    """Add one image to ``counts`` (per cap: detections shown, right, right whatever the label, instances
    found; :func:`match_detections`) for its detections ``shown``, best first, cut at each cap."""
    for cap, total in counts.items():
        total += [len(shown[:cap]), *match_detections(shown[:cap], instances, dataset)]


def cap_rows(counts: dict[int, np.ndarray], images: int, instances: int) -> list[dict]:
    """:func:`precision_recall` per cap of ``counts`` (:func:`count_caps`), smallest first, each with the
    precision of what it adds over the previous cap."""
    caps = sorted(counts)
    return [
        {"max_detections": c, **precision_recall(counts[c], images, instances, counts[p] if p else None)}
        for p, c in zip([None, *caps[:-1]], caps, strict=True)
    ]


def evaluate_detection(
    predictor: MaskPredictor, dataset: CocoInstances, image_indices: Sequence[int], proposals: int = 100
) -> tuple[dict, dict[int, tuple[list[Detection], float | None]]]:
    """AP of ``detect(score_threshold=0, max_detections=100, proposals=proposals)`` on every image.

    Pre-annotation at ``detect``'s default threshold and each cap of :data:`PRECISION_CAPS` (and the default
    cap) is the threshold-0 list cut there (it is sorted): detections per image, precision and recall
    (:func:`match_detections`; recall over instances with area > 32^2). The defaults' detections are
    returned with the image's top score (None without detections) for the first :data:`DETECTION_IMAGES`
    images with instances, keyed by image index.
    """
    threshold, limit = PREANNOTATION_THRESHOLD, PREANNOTATION_MAX
    results: list[dict] = []
    seconds: list[float] = []
    examples: dict[int, tuple[list[Detection], float | None]] = {}
    counts = {c: np.zeros(4, int) for c in {*PRECISION_CAPS, limit}}
    evaluated = 0
    for index in tqdm(image_indices, desc="detection", unit="image", dynamic_ncols=True):
        start = time.perf_counter()
        predictor.set_image(dataset.image(index))
        detections = predictor.detect(
            score_threshold=DETECTION_THRESHOLD, max_detections=DETECTION_MAX, proposals=proposals
        )
        seconds.append(time.perf_counter() - start)
        results += detections_to_coco(detections, dataset.images[index]["id"])
        instances = dataset.instances_by_image[index]
        shown = [d for d in detections if d.score >= threshold]
        count_caps(counts, shown, instances, dataset)
        evaluated += sum(inst.area > MIN_AREA and inst.has_mask for inst in instances)
        if len(examples) < DETECTION_IMAGES and instances:
            examples[index] = (shown[:limit], detections[0].score if detections else None)
    at = {row["max_detections"]: row for row in cap_rows(counts, len(image_indices), evaluated)}
    metrics = {
        "images": len(image_indices),
        "proposals": proposals,
        "score_threshold": DETECTION_THRESHOLD,
        "max_detections": DETECTION_MAX,
        "detections": len(results),
        "default_threshold": threshold,
        "default_max_detections": limit,
        "mean_detections_at_default": at[limit]["per_image"],
        "precision_at_default": at[limit]["precision"],
        "mask_precision_at_default": at[limit]["mask_precision"],
        "recall_at_default": at[limit]["recall"],
        "at_caps": list(at.values()),
        "median_seconds_per_image": statistics.median(seconds) if seconds else None,
        **detection_ap(coco_ground_truth(dataset, image_indices), results),
    }
    return metrics, examples


# ---- patches --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_patches(predictor: MaskPredictor, dataset: CocoInstances, n: int) -> dict[str, dict[str, float]]:
    """evalPerPatch: mask IoU of each trained stage on ``n`` un-augmented jittered windows of ``dataset``
    (``WindowSampler.mask_batch``, seed :data:`PATCH_SEED`), at the logits' resolution (56 px DeepMask,
    160 px SharpMask). ``{stage: {"n", "mean_iou", "success@0.5", "success@0.7"}}``."""
    stages = ["deepmask", "sharpmask"] if predictor.refine else ["deepmask"]
    sampler = WindowSampler(dataset, seed=PATCH_SEED, augment=False)
    ious: dict[str, list[torch.Tensor]] = {stage: [] for stage in stages}
    for start in tqdm(range(0, n, PATCH_BATCH), desc="patches", unit="batch", dynamic_ncols=True):
        inputs, targets = sampler.mask_batch(min(PATCH_BATCH, n - start))
        x, y = to_device(inputs, predictor.device), targets.to(predictor.device)
        for stage in stages:
            ious[stage].append(batch_iou(mask_logits(predictor.model, stage, x), y).cpu())
    out = {}
    for stage, parts in ious.items():
        iou = torch.cat(parts)
        out[stage] = {"n": len(iou), "mean_iou": iou.mean().item()}
        out[stage].update({f"success@{t}": (iou >= t).float().mean().item() for t in PATCH_THRESHOLDS})
    return out


# ---- tables ---------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or value < 0 else f"{value:.{digits}f}"


def tables(metrics: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables as ``(title, headers, rows)`` of strings, from the metrics dict."""
    out = []
    summary = metrics.get("instances", {}).get("summary")
    if summary:
        rows = []
        for method, entry in summary.items():
            for size in SIZES:
                stats = entry[size]
                rows.append(
                    [
                        method if size == "all" else "",
                        size,
                        str(stats["n"]),
                        _fmt(stats["miou"]),
                        _fmt(stats.get("se")),
                        *(_fmt(stats[f"success@{t}"]) for t in THRESHOLDS),
                        _fmt(entry["median_seconds"]) if size == "all" else "",
                    ]
                )
        headers = ["method", "size", "n", "mIoU", "SE", *(f"IoU>={t}" for t in THRESHOLDS), "median s/object"]
        out.append(("Instances (clicks, box prompt, baselines)", headers, rows))
    converged = metrics.get("instances", {}).get("convergence")
    if converged:
        out.append(convergence_table(converged))
    proposals = metrics.get("proposals")
    if proposals:
        names = [s for s in COCO_STATS if s.startswith("AR")]
        rows = [[iou_type, *(_fmt(proposals[iou_type][s]) for s in names)] for iou_type in ("segm", "bbox")]
        title = (
            f"Proposals: top {proposals['k']} per image, {proposals['images']} images, "
            f"median {proposals['median_seconds_per_image']:.2f} s/image"
        )
        out.append((title, ["type", *names], rows))
    out += label_tables(metrics.get("labels"))
    detection = metrics.get("detection")
    if detection:
        names = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"]
        rows = [[iou_type, *(_fmt(detection[iou_type][s]) for s in names)] for iou_type in ("segm", "bbox")]
        seconds = detection["median_seconds_per_image"]
        title = (
            f"Detection: COCO AP with categories, {detection['images']} images, score >= "
            f"{detection['score_threshold']:g}, <= {detection['max_detections']} per image; "
            f"{detection['mean_detections_at_default']:.1f} per image at the defaults (score >= "
            f"{detection['default_threshold']:g}, <= {detection['default_max_detections']} per image; "
            f"precision {_fmt(detection['precision_at_default'])}, "
            f"{_fmt(detection['mask_precision_at_default'])} whatever the label; recall "
            f"{_fmt(detection['recall_at_default'])})"
            + (f", median {seconds:.2f} s/image" if seconds is not None else "")
        )
        out.append((title, ["type", *names], rows))
        rows = [
            [str(r["max_detections"]), f"{r['per_image']:.2f}", *(_fmt(r[k]) for k in PR_COLUMNS)]
            for r in detection.get("at_caps", [])
        ]
        headers = [
            "at most",
            "per image",
            "precision",
            "precision, any label",
            "added ones, any label",
            "recall (> 32^2)",
        ]
        title = (
            f"Pre-annotation by detections per image (SEGMASK_MAX_DETECTIONS), score >= "
            f"{detection['default_threshold']:g}"
        )
        out.append((title, headers, rows))
    patches = metrics.get("patches")
    if patches:
        names = ["mean_iou", *(f"success@{t}" for t in PATCH_THRESHOLDS)]
        rows = [[stage, str(v["n"]), *(_fmt(v[s]) for s in names)] for stage, v in patches.items()]
        out.append(("Patches (evalPerPatch)", ["stage", "n", *names], rows))
    return out


def convergence_table(converged: dict) -> tuple[str, list[str], list[list[str]]]:
    """The table of :func:`convergence`: mIoU (standard error) after k interactions, NoC, never reached."""
    rows = []
    for name, by_size in converged.items():
        for size in SIZES:
            st = by_size[size]
            rows.append(
                [
                    name if size == "all" else "",
                    size,
                    str(st["n"]),
                    *(f"{_fmt(st[f'miou@{k}'])} ({_fmt(st[f'se@{k}'])})" for k in REPORTED_CLICKS),
                    *(_fmt(st[f"noc@{t}"], 2) for t in NOC_THRESHOLDS),
                    _fmt(st[f"never@{NOC_THRESHOLDS[0]}"]),
                ]
            )
    headers = [
        "sequence",
        "size",
        "n",
        *(f"mIoU@{k} (SE)" for k in REPORTED_CLICKS),
        *(f"NoC@{round(t * 100)}" for t in NOC_THRESHOLDS),
        f"never {NOC_THRESHOLDS[0]} in {MAX_CLICKS}",
    ]
    return f"Corrective clicks (simulated annotator, at most {MAX_CLICKS} interactions)", headers, rows


def label_tables(labels: dict | None) -> list[tuple[str, list[str], list[list[str]]]]:
    """The top-1 table (evaluated instances, all sizes) and the per-class table of :func:`label_summary`."""
    if not labels:
        return []
    rows = [
        [f"area > {MIN_AREA} px", str(labels["n"]), _fmt(labels["top1"])],
        ["all sizes", str(labels["all_sizes"]["n"]), _fmt(labels["all_sizes"]["top1"])],
    ]
    out = [("Labels: MultiPathNet top-1 on GT masks", ["instances", "n", "top-1"], rows)]
    if labels["per_class"]:
        rows = [
            [
                c["name"],
                str(c["n"]),
                _fmt(c["top1"]),
                f"{c['confusion']} ({c['confusion_n']})" if c["confusion"] else "-",
            ]
            for c in labels["per_class"]
        ]
        title = f"Labels per class (>= {FREQUENT_CLASS} instances, area > {MIN_AREA} px)"
        out.append((title, ["class", "n", "top-1", "most common confusion (n)"], rows))
    return out


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain text, columns aligned (first column left, the others right)."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first, *rest = zip(cells, widths, strict=True)
        return "  ".join([first[0].ljust(first[1]), *(c.rjust(w) for c, w in rest)]).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    return "\n".join(
        [
            "| " + " | ".join(headers) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|",
            *("| " + " | ".join(r) + " |" for r in rows),
        ]
    )


def format_tables(metrics: dict) -> str:
    """All tables as aligned plain text, with a header line naming the checkpoint and split."""
    head = (
        f"checkpoint {metrics['checkpoint']} | split {metrics['split']} "
        f"({len(metrics['image_ids'])} images) | {metrics['seconds']['total']:.0f} s"
    )
    return "\n\n".join([head, *(f"{title}\n{format_table(h, r)}" for title, h, r in tables(metrics))])


# ---- figures and report ---------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overlay(
    ax,
    image: np.ndarray,
    gt: list[np.ndarray],
    pred: np.ndarray,
    title: str,
    crop: np.ndarray | None = None,
    clicks: Sequence[Sequence[float]] = (),
    box: np.ndarray | None = None,
) -> None:
    """Draw ``image`` with the GT outlines (green) and ``pred`` filled in red on ``ax``.

    ``crop``: xyxy region to show (whole image when None); ``clicks`` ``[x, y, label]`` (positive: green +,
    negative: red x); ``box``: the prompt box (yellow, dashed). All in pixel edge coordinates.
    """
    from matplotlib.patches import Rectangle

    height, width = image.shape[:2]
    x0, y0, x1, y1 = (0, 0, width, height) if crop is None else (int(v) for v in crop)
    ax.imshow(image[y0:y1, x0:x1])
    rgba = np.zeros((y1 - y0, x1 - x0, 4), np.float32)
    rgba[pred[y0:y1, x0:x1]] = (1.0, 0.0, 0.0, 0.45)
    ax.imshow(rgba)
    for g in gt:
        if g[y0:y1, x0:x1].any():
            ax.contour(g[y0:y1, x0:x1].astype(np.float32), levels=[0.5], colors="lime", linewidths=1.2)
    for x, y, label in clicks:
        ax.plot(
            x - x0 - 0.5,
            y - y0 - 0.5,
            "+" if label else "x",
            color="lime" if label else "red",
            markersize=10,
            markeredgewidth=2,
        )
    if box is not None:
        ax.add_patch(
            Rectangle(
                (box[0] - x0 - 0.5, box[1] - y0 - 0.5),
                box[2] - box[0],
                box[3] - box[1],
                fill=False,
                edgecolor="yellow",
                linestyle="--",
                linewidth=1,
            )
        )
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def context_crop(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """xyxy region around an object box (half its larger side + 16 px on each side), inside the image."""
    margin = 0.5 * max(box[2] - box[0], box[3] - box[1]) + 16
    return np.array(
        [
            max(0, np.floor(box[0] - margin)),
            max(0, np.floor(box[1] - margin)),
            min(width, np.ceil(box[2] + margin)),
            min(height, np.ceil(box[3] + margin)),
        ]
    )


def pick_examples(results: list[InstanceResult], iou_of) -> list[tuple[str, InstanceResult]]:
    """Up to :data:`EXAMPLES_PER_GROUP` best, median and worst results by ``iou_of(result)``."""
    ranked = sorted(results, key=iou_of, reverse=True)
    n, k = len(ranked), EXAMPLES_PER_GROUP
    if n <= 3 * k:
        return [("", r) for r in ranked]
    mid = n // 2 - k // 2
    return (
        [("best", r) for r in ranked[:k]]
        + [("median", r) for r in ranked[mid : mid + k]]
        + [("worst", r) for r in ranked[-k:]]
    )


def plot_instances(
    path: Path, dataset: CocoInstances, picks: list[tuple[str, InstanceResult]], key: str, title: str
) -> None:
    """A 4-column grid of instance overlays with the stored ``key`` prediction ("click" or "box")."""
    plt = _pyplot()
    index_of = {im["id"]: i for i, im in enumerate(dataset.images)}
    inst_of = {inst.annotation_id: inst for inst in dataset.instances}
    cols = 4
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(picks) :]:
        ax.axis("off")
    for ax, (group, r) in zip(axes.flat, picks, strict=False):
        image = dataset.image(index_of[r.image_id])
        gt = dataset.mask(inst_of[r.annotation_id])
        box = np.array(r.box)
        iou = r.click_ious[0] if key == "click" else r.box_iou
        name = dataset.categories[r.category_id]
        caption = f"{group} {name} ({r.size}) IoU {iou:.2f}".strip()
        overlay(
            ax,
            image,
            [gt],
            rle_to_mask(r.masks[key]),
            caption,
            crop=context_crop(box, *image.shape[:2]),
            clicks=r.clicks[:1] if key == "click" else (),
            box=box if key == "box" else None,
        )
    fig.suptitle(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_click_sequences(
    path: Path, predictor: MaskPredictor, dataset: CocoInstances, picks: list[InstanceResult]
) -> None:
    """One row per result: its simulated clicks replayed on ``predictor``, the mask after each of
    :data:`SEQUENCE_STEPS` clicks (red) against the GT (green), with the clicks so far."""
    plt = _pyplot()
    index_of = {im["id"]: i for i, im in enumerate(dataset.images)}
    inst_of = {inst.annotation_id: inst for inst in dataset.instances}
    cols = len(SEQUENCE_STEPS)
    fig, axes = plt.subplots(
        len(picks), cols, figsize=(3.4 * cols, 3.0 * len(picks)), squeeze=False, layout="constrained"
    )
    for row, r in zip(axes, picks, strict=True):
        image = dataset.image(index_of[r.image_id])
        gt = dataset.mask(inst_of[r.annotation_id])
        predictor.set_image(image)
        crop = context_crop(np.array(r.box), *image.shape[:2])
        for ax, k in zip(row, SEQUENCE_STEPS, strict=True):
            clicks = r.clicks[:k]
            points = [c[:2] for c in clicks]
            pred = predictor.segment(points, [int(c[2]) for c in clicks]).mask
            caption = (
                f"{dataset.categories[r.category_id]}: {len(clicks)} clicks, IoU {mask_iou(pred, gt):.2f}"
            )
            overlay(ax, image, [gt], pred, caption, crop=crop, clicks=clicks)
    fig.suptitle("Corrective clicks on held-out objects (+ positive, x negative): prediction red, GT green")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def sequence_examples(results: list[InstanceResult], n: int = SEQUENCE_EXAMPLES) -> list[InstanceResult]:
    """Up to ``n`` results whose first click was not yet good enough, the largest objects first: the ones
    where corrective clicks matter."""
    weak = [r for r in results if r.click_ious and r.click_ious[0] < NOC_THRESHOLDS[0]]
    return sorted(weak, key=lambda r: -r.area)[:n]


def plot_proposals(path: Path, dataset: CocoInstances, examples: dict[int, list[tuple[dict, float]]]) -> None:
    """Rows of 5 per image: its top proposals (red) with objectness and best IoU against the GT (green)."""
    plt = _pyplot()
    cols, rows_per_image = 5, -(-TOP_PROPOSALS // 5)
    rows = rows_per_image * len(examples)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, layout="constrained"
    )
    for n, (index, props) in enumerate(examples.items()):
        image = dataset.image(index)
        gts = [dataset.mask(inst) for inst in dataset.instances_by_image[index]]
        panels = axes[n * rows_per_image : (n + 1) * rows_per_image].flat
        for rank, ax in enumerate(panels):
            if rank >= len(props):
                ax.axis("off")
                continue
            rle, score = props[rank]
            pred = rle_to_mask(rle)
            best = max(mask_iou(pred, g) for g in gts)
            caption = f"image {dataset.images[index]['id']} #{rank + 1} s={score:.2f} IoU {best:.2f}"
            overlay(ax, image, gts, pred, caption)
    fig.suptitle("Top proposals (red) and GT instances (green); IoU = best match")
    fig.savefig(path, dpi=70)
    plt.close(fig)


def gt_detections(dataset: CocoInstances, index: int) -> list[Detection]:
    """The image's non-crowd instances as :class:`Detection` (score 1, tight mask box), for drawing."""
    out = []
    for inst in dataset.instances_by_image[index]:
        mask = dataset.mask(inst)
        name = dataset.categories.get(inst.category_id, str(inst.category_id))
        out.append(Detection(name, inst.category_id, 1.0, mask, mask_to_box(mask)))
    return out


def plot_detections(
    path: Path,
    dataset: CocoInstances,
    examples: dict[int, tuple[list[Detection], float | None]],
    threshold: float,
    limit: int,
) -> None:
    """A row per image: its GT instances and the detections at ``threshold`` and at most ``limit``
    (``export.draw_detections``), captioned with the image's top detection score (:func:`evaluate_detection`'s
    examples)."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(examples), 2, figsize=(10, 3.9 * len(examples)), squeeze=False, layout="constrained"
    )
    for (index, (detections, top)), (left, right) in zip(examples.items(), axes, strict=True):
        image = dataset.image(index)
        gt = gt_detections(dataset, index)
        image_id = dataset.images[index]["id"]
        left.imshow(draw_detections(image, gt, show_scores=False))
        left.set_title(f"image {image_id}: {len(gt)} GT instances", fontsize=9)
        right.imshow(draw_detections(image, detections))
        best = "no detection" if top is None else f"top score {top:.2f}"
        right.set_title(
            f"image {image_id}: {len(detections)} shown (score >= {threshold:g}, at most {limit}; {best})",
            fontsize=9,
        )
        for ax in (left, right):
            ax.axis("off")
    fig.suptitle("Detections at detect()'s defaults (right) and the GT (left)")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(
    out: Path,
    metrics: dict,
    dataset: CocoInstances,
    results: list[InstanceResult],
    examples: dict[int, list[tuple[dict, float]]],
    detection_examples: dict[int, tuple[list[Detection], float | None]] | None = None,
) -> None:
    """``clicks.png``, ``box.png``, ``proposals.png``, ``detections.png`` (those that have data) and
    ``report.md`` in ``out``."""
    figures = []
    if results and results[0].click_ious:
        picks = pick_examples(results, lambda r: r.click_ious[0])
        plot_instances(
            out / "clicks.png",
            dataset,
            picks,
            "click",
            "One click (+) at the GT's deepest point: prediction red, GT green",
        )
        figures.append(("One-click results (best, median, worst)", "clicks.png"))
        figures.append(("Corrective clicks converging", "click-sequences.png"))
    if results and results[0].box_iou is not None:
        picks = pick_examples(results, lambda r: r.box_iou)
        plot_instances(
            out / "box.png",
            dataset,
            picks,
            "box",
            "Tight GT box (yellow) as the prompt: prediction red, GT green",
        )
        figures.append(("Box-prompt results (best, median, worst)", "box.png"))
    if examples:
        plot_proposals(out / "proposals.png", dataset, examples)
        figures.append((f"Top-{TOP_PROPOSALS} proposals", "proposals.png"))
    if detection_examples:
        threshold, limit = (metrics["detection"][k] for k in ("default_threshold", "default_max_detections"))
        plot_detections(out / "detections.png", dataset, detection_examples, threshold, limit)
        figures.append((f"Detections (score >= {threshold:g}, at most {limit}) and GT", "detections.png"))
    instances = metrics.get("instances", {})
    lines = [
        f"# Evaluation: {metrics['split']} split",
        "",
        f"- command: `{metrics['command']}`",
        f"- checkpoint: `{metrics['checkpoint']}` (stages: {', '.join(metrics['checkpoint_stages'])})",
        f"- data: `{metrics['data']}`, {len(metrics['image_ids'])} images, "
        f"{instances.get('n', 0)} instances (non-crowd, area > 32^2)",
        f"- hardware: {metrics['hardware']['cpu']}, {metrics['hardware']['torch_threads']} torch threads, "
        f"device {metrics['hardware']['device']}",
        f"- total {metrics['seconds']['total']:.0f} s",
    ]
    if instances.get("median_feature_seconds") is not None:
        lines.append(
            f"- click/box times exclude the per-image feature pass (`set_image`): median "
            f"{instances['median_feature_seconds']:.3f} s per image"
        )
    if instances.get("grabcut_fallbacks"):
        lines.append(
            f"- GrabCut had no background for {instances['grabcut_fallbacks']} whole-image boxes: "
            "the filled box stands in"
        )
    for part, reason in metrics.get("skipped", {}).items():
        lines.append(f"- {part}: skipped ({reason})")
    labels = metrics.get("labels")
    if labels and labels["not_in_label_set"]:
        lines.append(
            f"- labels: {labels['not_in_label_set']} evaluated instances have a category the checkpoint's "
            "label set lacks (counted wrong)"
        )
    for title, headers, rows in tables(metrics):
        lines += ["", f"## {title}", "", markdown_table(headers, rows)]
    for title, name in figures:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


# ---- the command ----------------------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "opencv": cv2.__version__,
        "platform": platform.platform(),
    }


def evaluate(
    data: str | Path,
    split: str,
    out: str | Path,
    checkpoint: str | Path | None = None,
    max_images: int | None = None,
    skip: Iterable[str] = (),
    proposals_k: int = 1000,
    patches: int = 1000,
    device: str = "cpu",
    command: str = "",
    detection_proposals: int = 100,
) -> dict:
    """Run every part not in ``skip`` (:data:`PARTS`) on the first ``max_images`` images (by id) of ``split``;
    write ``metrics.json``, ``table.txt``, ``report.md`` and the figures to ``out``; return the metrics.

    ``labels`` and ``detection`` run only when the checkpoint has a MultiPathNet (otherwise they are noted
    in ``metrics["skipped"]``); ``detection_proposals``: refined windows ``detect`` classifies per image."""
    unknown = set(skip) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts to skip {sorted(unknown)}; choose from {PARTS}")
    parts = set(PARTS) - set(skip)
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    predictor = load_predictor(checkpoint, device)
    skipped: dict[str, str] = {}
    if predictor.model.multipathnet is None and parts & set(LABEL_PARTS):
        for part in sorted(parts & set(LABEL_PARTS)):
            skipped[part] = "the checkpoint has no MultiPathNet"
        log.info("skipping %s: the checkpoint has no MultiPathNet", ", ".join(sorted(skipped)))
        parts -= set(LABEL_PARTS)
    dataset = CocoInstances(data, split)
    image_indices = sorted(range(len(dataset)), key=lambda i: dataset.images[i]["id"])[:max_images]
    log.info(
        "evaluating %s on %d %s images: %s",
        checkpoint or DEFAULT_CHECKPOINT,
        len(image_indices),
        split,
        ", ".join(sorted(parts)),
    )
    metrics: dict = {
        "command": command,
        "checkpoint": str(Path(checkpoint or DEFAULT_CHECKPOINT).resolve()),
        "checkpoint_stages": predictor.metadata.get("stages", []),
        "checkpoint_training": predictor.metadata.get("training", {}),
        "data": str(Path(data).resolve()),
        "split": split,
        "image_ids": [dataset.images[i]["id"] for i in image_indices],
        "hardware": hardware(predictor.device),
        "protocol": {
            "min_area": MIN_AREA,
            "large_area": LARGE_AREA,
            "max_clicks": MAX_CLICKS,
            "box_threshold_logit": predictor.box_threshold_logit,
            "grabcut_iterations": GRABCUT_ITERATIONS,
            "mask_threshold_logit": predictor.threshold_logit,
            "scales": list(predictor.scales),
            "refined": predictor.refine,
            "patch_seed": PATCH_SEED,
            "label_frequent_class": FREQUENT_CLASS,
            "detection": {
                "score_threshold": DETECTION_THRESHOLD,
                "max_detections": DETECTION_MAX,
                "proposals": detection_proposals,
            },
        },
        "skipped": skipped,
        "seconds": {},
    }
    results: list[InstanceResult] = []
    examples: dict[int, list[tuple[dict, float]]] = {}
    if parts & {"clicks", "box", "baselines"}:
        start = time.perf_counter()
        results, feature_seconds = evaluate_instances(predictor, dataset, image_indices, parts)
        metrics["instances"] = {
            "n": len(results),
            "median_feature_seconds": statistics.median(feature_seconds) if feature_seconds else None,
            "grabcut_fallbacks": sum(r.grabcut_fallback for r in results),
            "summary": summarise(results),
            "convergence": convergence(results),
            "results": [r.to_json() for r in results],
        }
        metrics["seconds"]["instances"] = time.perf_counter() - start
    if "proposals" in parts:
        start = time.perf_counter()
        metrics["proposals"], examples = evaluate_proposals(predictor, dataset, image_indices, proposals_k)
        metrics["seconds"]["proposals"] = time.perf_counter() - start
    if "patches" in parts:
        start = time.perf_counter()
        metrics["patches"] = evaluate_patches(predictor, dataset, patches)
        metrics["seconds"]["patches"] = time.perf_counter() - start
    if "labels" in parts:
        start = time.perf_counter()
        labels = evaluate_labels(predictor, dataset, image_indices)
        metrics["labels"] = {
            **label_summary(labels, dataset.categories),
            "results": [asdict(r) for r in labels],
        }
        metrics["seconds"]["labels"] = time.perf_counter() - start
    detection_examples: dict[int, tuple[list[Detection], float | None]] = {}
    if "detection" in parts:
        start = time.perf_counter()
        metrics["detection"], detection_examples = evaluate_detection(
            predictor, dataset, image_indices, detection_proposals
        )
        metrics["seconds"]["detection"] = time.perf_counter() - start
    metrics["seconds"]["total"] = time.perf_counter() - started
    if results and results[0].click_ious:
        plot_click_sequences(out / "click-sequences.png", predictor, dataset, sequence_examples(results))
    write_report(out, metrics, dataset, results, examples, detection_examples)
    (out / "table.txt").write_text(format_tables(metrics) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("wrote %s", out)
    return metrics
