"""Detections out of the process: COCO results and files, and overlays to look at.

- :func:`detections_to_coco`: a list of :class:`~segmodels.predictor.Detection` of one image as COCO result
  entries (what ``COCO.loadRes`` and ``COCOeval`` read);
- :func:`write_coco`: a complete COCO-format file (images, categories, annotations with ids and area),
  written atomically, with each annotation's ``score`` kept;
- :func:`draw_detections`: an RGB overlay (filled masks coloured per detection, outline, box, label and
  score), used by ``segmask predict`` and by ``segmask evaluate``'s detection figure;
- :func:`predict_files`: what ``segmask predict`` does with a list of image files.

Coordinates follow geometry.py: masks ``bool (H, W)``, ``Detection.box`` xyxy pixels with exclusive right and
bottom edges; COCO boxes are ``[x, y, w, h]`` in the same pixel frame.
"""

from __future__ import annotations

import colorsys
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from segmodels.checkpoint_files import atomic_write_json
from segmodels.geometry import mask_to_rle
from segmodels.predictor import PREANNOTATION_MAX, PREANNOTATION_THRESHOLD, Detection

log = logging.getLogger(__name__)

FILL_ALPHA = 0.45
# Tag text: black on light tag colours (ITU-R BT.601 luma above this), white on dark ones.
LIGHT_TAG_LUMA = 150


# ---- COCO ----------------------------------------------------------------------------------------------
def coco_box(box: np.ndarray, height: int, width: int) -> list[float]:
    """``[x, y, w, h]`` of an xyxy pixel box clipped to the ``height`` x ``width`` image."""
    x1, x2 = (float(np.clip(v, 0, width)) for v in (box[0], box[2]))
    y1, y2 = (float(np.clip(v, 0, height)) for v in (box[1], box[3]))
    return [x1, y1, max(0.0, x2 - x1), max(0.0, y2 - y1)]


def detections_to_coco(detections: Sequence[Detection], image_id: int) -> list[dict]:
    """COCO result entries of one image: ``image_id``, ``category_id`` (the detection's ``class_id``),
    ``segmentation`` (compressed RLE, ``counts`` a str), ``bbox`` (``Detection.box`` clipped to the image,
    as xywh) and ``score``.

    ``COCO.loadRes`` takes its ``area`` from ``bbox`` when both are present: to evaluate masks with the
    masks' areas (COCO's size ranges), drop ``bbox`` from copies of the entries (see
    ``coco_scoring.detection_ap``).
    """
    out = []
    for d in detections:
        height, width = d.mask.shape
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(d.class_id),
                "segmentation": mask_to_rle(d.mask),
                "bbox": coco_box(np.asarray(d.box, dtype=np.float64), height, width),
                "score": float(d.score),
            }
        )
    return out


def rle_area(rle: dict) -> int:
    """Pixel count of a compressed RLE (``counts`` str or bytes)."""
    counts = rle["counts"]
    return int(
        mask_utils.area(
            {"size": list(rle["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
        )
    )


def coco_dataset(images: Sequence[dict], categories: Sequence[dict], results: Sequence[dict]) -> dict:
    """A COCO-format dict: ``images`` and ``categories`` as given, ``results`` as ``annotations`` with ids
    1..N, ``area`` (mask pixels, or the box's area for box-only results) and ``iscrowd = 0``; ``score`` and
    every other key of a result are kept."""
    annotations = []
    for n, result in enumerate(results, start=1):
        ann = dict(result)
        if "segmentation" in ann:
            area = float(rle_area(ann["segmentation"]))
        else:
            area = float(ann["bbox"][2] * ann["bbox"][3])
        ann.update({"id": n, "area": area, "iscrowd": 0})
        annotations.append(ann)
    return {
        "info": {"description": "segmask predictions"},
        "images": list(images),
        "categories": list(categories),
        "annotations": annotations,
    }


def write_coco(
    path: str | Path, images: Sequence[dict], categories: Sequence[dict], results: Sequence[dict]
) -> Path:
    """Write :func:`coco_dataset` to ``path`` atomically (a temporary file renamed into place).

    ``images``: ``{"id", "file_name", "width", "height"}``; ``categories``: ``{"id", "name"}``; ``results``:
    COCO result entries (:func:`detections_to_coco`). The file loads with ``pycocotools.coco.COCO(path)``.
    """
    path = Path(path)
    atomic_write_json(path, coco_dataset(images, categories, results))
    return path


def checkpoint_categories(classes: Sequence[str], class_ids: Sequence[int]) -> list[dict]:
    """COCO categories ``{"id", "name"}`` of a checkpoint's label set (``config.classes``/``class_ids``)."""
    return [{"id": int(i), "name": str(n)} for n, i in zip(classes, class_ids, strict=True)]


# ---- drawing -------------------------------------------------------------------------------------------
def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated saturated RGB colours (golden-ratio hue steps), the same for the same ``n``."""
    out = []
    for k in range(n):
        r, g, b = colorsys.hsv_to_rgb((0.08 + 0.618034 * k) % 1.0, 0.85, 0.95)
        out.append((int(255 * r), int(255 * g), int(255 * b)))
    return out


def draw_detections(
    image: np.ndarray,
    detections: Sequence[Detection],
    alpha: float = FILL_ALPHA,
    boxes: bool = True,
    text: bool = True,
    show_scores: bool = True,
) -> np.ndarray:
    """A copy of ``image`` (``(H, W, 3) uint8 RGB``) with each detection's mask filled in its own colour
    (blended with ``alpha``) and outlined, its box (``boxes``) and ``label score`` (``text``; the label alone
    without ``show_scores``).

    Detections are painted worst first, so the best one lies on top where masks overlap; the labels are
    written last, each on a filled tag of the detection's colour at the top-left of its box.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    out = image.copy()
    colours = palette(len(detections))
    order = sorted(range(len(detections)), key=lambda i: detections[i].score)
    thickness = max(1, round(max(height, width) / 400))
    for i in order:
        mask = np.asarray(detections[i].mask, dtype=bool)
        if mask.shape != (height, width):
            raise ValueError(f"detection {i}: mask {mask.shape} does not match the image {(height, width)}")
        colour = np.array(colours[i], np.float32)
        out[mask] = (out[mask] * (1 - alpha) + colour * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colours[i], thickness, cv2.LINE_AA)
    if boxes:
        for i in order:
            x1, y1, x2, y2 = (int(round(v)) for v in detections[i].box)
            cv2.rectangle(out, (x1, y1), (x2 - 1, y2 - 1), colours[i], 1, cv2.LINE_AA)
    if text:
        scale = max(0.35, max(height, width) / 1600)
        for i in order:
            d = detections[i]
            caption = f"{d.label} {d.score:.2f}" if show_scores else d.label
            (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
            x = int(np.clip(round(float(d.box[0])), 0, max(0, width - tw - 2)))
            y = int(np.clip(round(float(d.box[1])), th + base + 2, height))
            cv2.rectangle(out, (x, y - th - base - 2), (x + tw + 2, y), colours[i], cv2.FILLED)
            r, g, b = colours[i]
            ink = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > LIGHT_TAG_LUMA else (255, 255, 255)
            cv2.putText(
                out,
                caption,
                (x + 1, y - base - 1),
                cv2.FONT_HERSHEY_SIMPLEX,
                scale,
                ink,
                1,
                cv2.LINE_AA,
            )
    return out


# ---- segmask predict -----------------------------------------------------------------------------------
@dataclass
class PredictSummary:
    """What :func:`predict_files` did: the output directory, images and detections written, and the files
    that failed with their errors."""

    out: Path
    images: int = 0
    detections: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def read_rgb(path: str | Path) -> np.ndarray:
    """``(H, W, 3) uint8 RGB`` of an image file (any format OpenCV reads; grey images become RGB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: not an image OpenCV can read")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def label_counts(detections: Sequence[Detection]) -> str:
    """``"person x2, dog"``: labels by count, most frequent first."""
    return ", ".join(
        f"{name} x{n}" if n > 1 else name for name, n in Counter(d.label for d in detections).most_common()
    )


def predict_files(
    predictor,
    paths: Sequence[str | Path],
    out: str | Path,
    score_threshold: float = PREANNOTATION_THRESHOLD,
    max_detections: int = PREANNOTATION_MAX,
    progress: bool = True,
) -> PredictSummary:
    """``predictor.detect`` on each image file; writes ``out/predictions.json`` (:func:`write_coco`: images
    numbered 1..N in the order read, ``file_name`` as given, categories of the checkpoint),
    ``out/results.json`` (the plain COCO results list) and ``out/<stem>.png`` overlays.

    A summary line per image goes to stdout; a file that cannot be read is reported on stderr and skipped,
    and the others go on. ``predictor``: a :class:`~segmodels.predictor.MaskPredictor` whose checkpoint
    has a MultiPathNet; ``progress``: show a tqdm bar.
    """
    from tqdm import tqdm

    if predictor.model.multipathnet is None:
        raise ValueError("this checkpoint has no MultiPathNet stage (train one: segmask train multipathnet)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary(out)
    images: list[dict] = []
    results: list[dict] = []
    stems: set[str] = set()
    bar = tqdm(paths, desc="predict", unit="image", dynamic_ncols=True, disable=not progress)
    for path in bar:
        try:
            image = read_rgb(path)
        except (OSError, ValueError) as exc:
            summary.failed.append((str(path), str(exc)))
            tqdm.write(f"error: {exc}", file=sys.stderr)
            continue
        image_id = len(images) + 1
        height, width = image.shape[:2]
        predictor.set_image(image)
        detections = predictor.detect(score_threshold=score_threshold, max_detections=max_detections)
        images.append({"id": image_id, "file_name": str(path), "width": width, "height": height})
        results += detections_to_coco(detections, image_id)
        stem = Path(path).stem
        if stem in stems or stem in ("predictions", "results"):
            stem = f"{stem}_{image_id}"
        stems.add(stem)
        overlay = draw_detections(image, detections)
        cv2.imwrite(str(out / f"{stem}.png"), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
        summary.images += 1
        summary.detections += len(detections)
        line = f"{path}: {len(detections)} detection{'' if len(detections) == 1 else 's'}" + (
            f" ({label_counts(detections)})" if detections else ""
        )
        tqdm.write(line)
    cfg = predictor.model.config
    write_coco(out / "predictions.json", images, checkpoint_categories(cfg.classes, cfg.class_ids), results)
    atomic_write_json(out / "results.json", results)
    return summary
