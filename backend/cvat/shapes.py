"""Predictor output -> CVAT shapes, for both routes: cvat-sdk function modules (``LabeledShapeRequest`` and
``InteractionResultShape`` objects) and nuclio functions (the JSON CVAT's lambda manager reads).

Formats (all pixels, top-left origin):

- cvat-sdk masks: ``cvat_sdk.masks.encode_mask`` run lengths over the mask's tight box, then
  ``[x1, y1, x2 - 1, y2 - 1]`` (inclusive corners), exactly CVAT's stored mask format;
- polygons: flat ``[x1, y1, x2, y2, ...]`` vertices in pixel edge coordinates (segmodels.geometry);
- nuclio detector mask items: ``"mask"`` = the row-major 0/1 crop of the inclusive box ``[xtl, ytl, xbr,
  ybr]`` followed by those four numbers (CVAT's ``to_cvat_mask``), with ``"points"`` the polygon;
- nuclio interactor result: one object ``{"mask": 2-D 0/1 crop, "bounds": [xtl, ytl, xbr, ybr] inclusive,
  "points": [[x, y], ...]}``.

Masks are the original image's; polygons are traced at its working size (``SEGMASK_MAX_WORK_SIDE``, where
the model made the mask) and scaled to its pixels.
"""

from __future__ import annotations

from typing import Any

import cvat_sdk.auto_annotation as cvataa
import numpy as np
from cvat_sdk.masks import encode_mask

from backend.cvat.runtime import shared_settings
from backend.working_size import mask_polygons
from segmodels.geometry import mask_to_box
from segmodels.predictor import Detection


def outlines(mask: np.ndarray, max_parts: int = 4) -> list[np.ndarray]:
    """Polygons ``(N, 2)`` of a bool ``(H, W)`` mask in its pixels, largest first (:func:`mask_polygons`)."""
    return mask_polygons(mask, shared_settings().max_work_side, max_parts)


def outline(mask: np.ndarray) -> np.ndarray | None:
    """The polygon of the mask's largest part, or None for an empty mask."""
    polygons = outlines(mask, max_parts=1)
    return polygons[0] if polygons else None


def flat_polygon(polygon: np.ndarray) -> list[float]:
    """``(N, 2)`` vertices -> ``[x1, y1, x2, y2, ...]`` rounded to 0.01 px."""
    return [round(float(v), 2) for v in np.asarray(polygon).reshape(-1)]


def sdk_detection_shapes(detections: list[Detection], label_ids: dict[str, int], polygons: bool) -> list[Any]:
    """cvat-sdk shapes for ``detections`` (``label_ids``: lower-cased model class -> spec label id; other
    classes are dropped): one mask each, or with ``polygons`` one polygon per separate part of the mask."""
    shapes = []
    for det in detections:
        label_id = label_ids.get(det.label.lower())
        if label_id is None or not det.mask.any():
            continue
        if polygons:
            shapes += [cvataa.polygon(label_id, flat_polygon(p)) for p in outlines(det.mask) if len(p) >= 3]
        else:
            shapes.append(cvataa.mask(label_id, encode_mask(det.mask)))
    return shapes


def interaction_shape(mask: np.ndarray) -> cvataa.InteractionResultShape:
    """The one ``InteractionResultShape`` of an interaction call: the mask, CVAT-encoded."""
    return cvataa.InteractionResultShape(type="mask", points=encode_mask(np.asarray(mask, dtype=bool)))


def inclusive_box(mask: np.ndarray) -> list[int]:
    """``[xtl, ytl, xbr, ybr]`` inclusive pixel corners of a non-empty mask's tight box."""
    x1, y1, x2, y2 = (int(v) for v in mask_to_box(mask))
    return [x1, y1, x2 - 1, y2 - 1]


def nuclio_detection_items(detections: list[Detection], shape_type: str = "mask") -> list[dict]:
    """CVAT nuclio detector items for ``detections``: ``shape_type`` "mask" (the mask crop plus the polygon as
    ``points``) or "polygon" (the largest part's polygon). Confidences are strings, as CVAT expects."""
    items = []
    for det in detections:
        polygon = outline(det.mask)
        if polygon is None or len(polygon) < 3:
            continue
        item = {
            "label": det.label,
            "type": shape_type,
            "points": flat_polygon(polygon),
            "confidence": f"{det.score:.4f}",
            "attributes": [],
        }
        if shape_type == "mask":
            box = inclusive_box(det.mask)
            crop = det.mask[box[1] : box[3] + 1, box[0] : box[2] + 1]
            item["mask"] = crop.astype(np.uint8).reshape(-1).tolist() + box
        items.append(item)
    return items


def nuclio_interaction_result(mask: np.ndarray) -> dict:
    """The interactor's one object: the mask's crop, its inclusive ``bounds`` and its outline ``points``
    (an empty mask gives an empty ``mask`` list, no bounds and no points)."""
    if not mask.any():
        return {"mask": [], "points": []}
    box = inclusive_box(mask)
    crop = mask[box[1] : box[3] + 1, box[0] : box[2] + 1]
    polygon = outline(mask)
    points = [] if polygon is None else [[round(float(x), 2), round(float(y), 2)] for x, y in polygon]
    return {"mask": crop.astype(np.uint8).tolist(), "bounds": box, "points": points}
