"""Label Studio annotations -> a COCO-format dataset (what a training job trains on, and keeps as a snapshot).

Per task, one annotation counts: a ground-truth one if there is one, else the most recently updated one;
cancelled (skipped) annotations and empty ones are ignored. Its regions become COCO instances:

- ``polygonlabels``: percent points -> pixel polygon (``segmentation`` [[x1, y1, ...]]);
- ``brushlabels``: Label Studio's RLE -> mask -> COCO RLE;
- ``rectanglelabels``: a box-only instance (``segmentation`` []), used to train the classifier, never as a
  mask target; a rectangle that merely prompted a mask region of the same label (box IoU >= 0.5) is dropped;
- smart keypoints and other result types are prompts or other tasks' data, and are ignored.

Coordinates: Label Studio regions are percent of ``original_width``/``original_height``; the dataset is in
pixels of the image as downloaded (COCO ``bbox`` is ``[x, y, w, h]``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from backend.labelstudio import ProjectConfig
from backend.ls_geometry import percent_to_points, rectangle_pixel_box
from segmodels.checkpoint_files import atomic_write_json
from segmodels.geometry import box_iou_xyxy, mask_to_box, mask_to_rle, polygon_to_mask
from segmodels.splits import in_split

MASK_TYPES = ("polygonlabels", "brushlabels")


def label_set(config: ProjectConfig) -> list[str]:
    """The project's classes: labels of its PolygonLabels/BrushLabels/RectangleLabels controls on images,
    in config order, each once (smart keypoint labels are prompts, not classes)."""
    labels: list[str] = []
    for control in config.interface.controls:
        if control.tag in ("PolygonLabels", "BrushLabels", "RectangleLabels"):
            labels += [label for label in control.labels if label not in labels]
    return labels


def chosen_annotation(task: dict) -> dict | None:
    """The annotation of ``task`` to train on (see the module docstring), or None."""
    usable = [a for a in task.get("annotations") or [] if not a.get("was_cancelled") and a.get("result")]
    if not usable:
        return None
    return max(
        usable, key=lambda a: (bool(a.get("ground_truth")), a.get("updated_at") or "", a.get("id") or 0)
    )


def region_instance(region: dict, width: int, height: int) -> dict | None:
    """``{"label", "mask" (bool (H, W)) | None, "box" [x, y, w, h] pixels}`` for one result, or None."""
    kind, value = region.get("type"), region.get("value") or {}
    labels = value.get(kind) if kind else None
    if kind not in (*MASK_TYPES, "rectanglelabels") or not labels:
        return None
    if kind == "polygonlabels":
        points = np.asarray(value.get("points") or [], dtype=np.float64).reshape(-1, 2)
        if len(points) < 3:
            return None
        mask = polygon_to_mask(percent_to_points(points, width, height), height, width)
    elif kind == "brushlabels":
        rgba = decode_rle(value["rle"]).reshape(region["original_height"], region["original_width"], 4)
        mask = _resized(rgba[:, :, 3] > 0, width, height)
    else:
        box = _rectangle_box(value, width, height)
        return {"label": labels[0], "mask": None, "box": box} if box[2] > 1 and box[3] > 1 else None
    if not mask.any():
        return None
    x1, y1, x2, y2 = mask_to_box(mask)
    return {"label": labels[0], "mask": mask, "box": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]}


def _rectangle_box(value: dict, width: int, height: int) -> list[float]:
    """``[x, y, w, h]`` pixels around a (possibly rotated) percent rectangle, clipped to the image."""
    x1, y1, x2, y2 = rectangle_pixel_box(
        value["x"],
        value["y"],
        value["width"],
        value["height"],
        float(value.get("rotation") or 0.0),
        width,
        height,
    )
    return [x1, y1, max(x2 - x1, 0.0), max(y2 - y1, 0.0)]


def _resized(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height))) > 127


def _xyxy(box: list[float]) -> list[float]:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``, same units."""
    x, y, w, h = box
    return [x, y, x + w, y + h]


def annotation_instances(annotation: dict, width: int, height: int) -> list[dict]:
    """The instances of one annotation, prompt rectangles removed (see the module docstring)."""
    found = [i for i in (region_instance(r, width, height) for r in annotation["result"]) if i]
    masks = [i for i in found if i["mask"] is not None]
    return masks + [
        i
        for i in found
        if i["mask"] is None
        and not any(
            m["label"] == i["label"] and box_iou_xyxy(_xyxy(m["box"]), _xyxy(i["box"])) >= 0.5 for m in masks
        )
    ]


@dataclass
class DatasetSummary:
    """What a snapshot holds: images, instances per label, and the tasks each split came from."""

    images: int = 0
    instances: int = 0
    per_label: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    train_image_ids: list[int] = field(default_factory=list)
    heldout_image_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return self.__dict__.copy()


def is_heldout(task_id: int) -> bool:
    """The held-out slice of a project: the tasks whose ids (the dataset's image ids) fall in the val split of
    ``segmodels.splits.in_split``, every multiple of 5 (stable across versions)."""
    return in_split(task_id, "val")


def write_dataset(
    tasks: list[dict],
    config: ProjectConfig,
    fetch: Callable[[str], bytes],
    out: Path,
) -> DatasetSummary:
    """Write ``out/instances.json`` and ``out/images/<task id>.<ext>`` for the annotated ``tasks``.

    ``fetch(url)`` returns an image's bytes (backend.images, with Label Studio credentials). COCO image ids
    are Label Studio task ids; categories are :func:`label_set` (ids 1..N) plus labels found in annotations
    that the config no longer has, so nothing annotated is lost.
    """
    labels = label_set(config)
    to_name, image_key = next(iter(config.images.items()))
    (out / "images").mkdir(parents=True, exist_ok=True)
    summary = DatasetSummary()
    images, annotations = [], []
    for task in sorted(tasks, key=lambda t: t["id"]):
        annotation = chosen_annotation(task)
        if annotation is None:
            summary.skipped["no usable annotation"] = summary.skipped.get("no usable annotation", 0) + 1
            continue
        url = config.image_url(task, to_name)
        data = fetch(url)
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            ext = (img.format or "png").lower().replace("jpeg", "jpg")
        instances = annotation_instances(annotation, width, height)
        if not instances:
            summary.skipped["no regions"] = summary.skipped.get("no regions", 0) + 1
            continue
        file_name = f"{task['id']}.{ext}"
        (out / "images" / file_name).write_bytes(data)
        images.append(
            {"id": task["id"], "file_name": file_name, "width": width, "height": height, "ls_url": url}
        )
        for inst in instances:
            if inst["label"] not in labels:
                labels.append(inst["label"])
            annotations.append(
                _coco_annotation(len(annotations) + 1, task["id"], labels.index(inst["label"]) + 1, inst)
            )
            summary.per_label[inst["label"]] = summary.per_label.get(inst["label"], 0) + 1
        (summary.heldout_image_ids if is_heldout(task["id"]) else summary.train_image_ids).append(task["id"])
    summary.images, summary.instances = len(images), len(annotations)
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": n + 1, "name": name} for n, name in enumerate(labels)],
    }
    atomic_write_json(out / "instances.json", coco)
    (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2))
    return summary


def _coco_annotation(ann_id: int, image_id: int, category_id: int, inst: dict) -> dict:
    if inst["mask"] is None:
        segmentation, area = [], inst["box"][2] * inst["box"][3]
    else:
        segmentation, area = mask_to_rle(inst["mask"]), float(inst["mask"].sum())
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "area": area,
        "bbox": [round(v, 2) for v in inst["box"]],
        "iscrowd": 0,
    }
