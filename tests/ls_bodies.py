"""Label Studio request bodies for backend tests: the captured 1.23.2 bodies, pointed at COCO128 images."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import cv2
import numpy as np

from segmodels.geometry import coco_segmentation_to_mask

# Recorded from a real Label Studio 1.23.2, tokens redacted (docs/label-studio-protocol.md).
LS_REQUESTS = Path(__file__).resolve().parent / "fixtures" / "label-studio-requests"


def captured(name: str) -> dict:
    """The JSON body of a request captured from a real Label Studio 1.23.2 (a fresh copy)."""
    return json.loads((LS_REQUESTS / f"{name}.json").read_text())["json"]


def interior_point(coco128: Path, image_id: int, category: str) -> tuple[float, float, np.ndarray]:
    """``(x%, y%, gt_mask)``: the point of the largest ``category`` instance farthest from its boundary."""
    coco = json.loads((coco128 / "instances.json").read_text())
    image = next(im for im in coco["images"] if im["id"] == image_id)
    cat = next(c["id"] for c in coco["categories"] if c["name"] == category)
    ann = max(
        (a for a in coco["annotations"] if a["image_id"] == image_id and a["category_id"] == cat),
        key=lambda a: a["area"],
    )
    mask = coco_segmentation_to_mask(ann["segmentation"], image["height"], image["width"])
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return (x + 0.5) / image["width"] * 100, (y + 0.5) / image["height"] * 100, mask


def upload_path(image_id: int) -> str:
    return f"/data/upload/1/{image_id:012d}.jpg"


def with_image(body: dict, image_id: int) -> dict:
    """A copy of ``body`` whose tasks show COCO128 image ``image_id`` (as a Label Studio upload)."""
    body = copy.deepcopy(body)
    for task in body["tasks"]:
        task["data"]["image"] = upload_path(image_id)
    return body


def keypoints(body: dict, image_id: int, points: list[tuple[float, float, bool]], label: str = "dog") -> dict:
    """The captured keypoint body with smart points ``(x%, y%, positive)`` of ``label`` on ``image_id``."""
    body = with_image(body, image_id)
    template = body["params"]["context"]["result"][0]
    items = []
    for x, y, positive in points:
        item = copy.deepcopy(template)
        item["value"].update(x=x, y=y, labels=[label], keypointlabels=[label])
        item["is_positive"] = positive
        items.append(item)
    body["params"]["context"]["result"] = items
    return body


def rectangle(
    body: dict, image_id: int, box_pct: tuple[float, float, float, float], label: str = "dog"
) -> dict:
    """The captured rectangle body with a smart rectangle ``(x%, y%, w%, h%)`` on ``image_id``."""
    body = with_image(body, image_id)
    value = body["params"]["context"]["result"][0]["value"]
    value.update(dict(zip(("x", "y", "width", "height"), box_pct, strict=True)), rectanglelabels=[label])
    return body
