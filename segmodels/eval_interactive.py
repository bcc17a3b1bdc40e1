"""Interactive quality: the simulated annotator (annotator.py, the RITM protocol) driving a predictor on the
evaluated instances, and the baselines (baselines.py) on the same instances.

- the evaluated instances: non-crowd annotations with COCO ``area`` > 32^2 px (:data:`MIN_AREA`, which every
  part of ``segmask evaluate`` uses), masks rasterised as COCO does; sizes as COCO: medium 32^2..96^2, large
  > 96^2;
- click-to-mask: one positive click at the interior point farthest from the GT boundary, then up to 19
  corrective clicks, each at the point farthest from the boundary of the larger error region (a missed part
  gets a positive click, a spurious part a negative one); every call passes all the clicks so far. Reported:
  mIoU after 1, 2, 3, 5 and 10 clicks with standard errors, NoC@85 and NoC@90 (clicks to reach the IoU, 20
  when never reached), and the share of objects that never reach 0.85 in 20 clicks;
- box-to-mask: the tight GT box as the prompt, then the same corrective clicks (the box counts as the first
  interaction);
- baselines: the filled GT box, and OpenCV GrabCut from the tight box.

Used by ``segmask evaluate``, fine-tuning's comparison (``finetune.py``) and ``bench/bench_interactive.py``.
Coordinates follow geometry.py: images ``(H, W, 3) uint8 RGB``, masks ``bool (H, W)``, points ``(x, y)`` in
pixel edge coordinates (pixel (row r, column c) has its centre at ``(c + 0.5, r + 0.5)``), boxes float
``[x1, y1, x2, y2]`` with exclusive right/bottom edges.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from segmodels.annotator import click_point, next_click
from segmodels.baselines import filled_box_mask, grabcut_mask
from segmodels.data import CocoInstances
from segmodels.geometry import mask_iou, mask_to_box, mask_to_rle
from segmodels.predictor import MaskPredictor

MIN_AREA = 32**2
LARGE_AREA = 96**2
SIZES = ("all", "medium", "large")
THRESHOLDS = (0.5, 0.75, 0.85)
# Interactions per object (a box or the first click, then corrections), and those reported.
MAX_CLICKS = 20
REPORTED_CLICKS = (1, 2, 3, 5, 10)
NOC_THRESHOLDS = (0.85, 0.9)
SEQUENCES = ("clicks", "box + clicks")


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


def size_of(area: float) -> str:
    """COCO size class of an instance area in px (the evaluated instances are never small)."""
    return "large" if area > LARGE_AREA else "medium"


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
        pred = predictor.segment(points=points or None, point_labels=labels or None, box=box).mask
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
