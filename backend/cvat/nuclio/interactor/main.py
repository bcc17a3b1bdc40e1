"""Nuclio interactor handler (CVAT "AI Tools" > Interactors): clicks and an optional box -> one mask.

Request ``{"image": base64, "pos_points": [[x, y], ...], "neg_points": [[x, y], ...], "obj_bbox": [[x1, y1],
[x2, y2]] | []}`` in pixels; response ONE object ``{"mask": 2-D 0/1 crop, "bounds": [xtl, ytl, xbr, ybr]
(inclusive), "points": [[x, y], ...]}``. Features are cached by image content hash, so further clicks on
the same image skip the trunk.
"""

import math

from backend.cvat.nuclio_io import max_base64_chars, serve
from backend.cvat.runtime import decode_base64_image, shared_segmenter
from backend.cvat.shapes import nuclio_interaction_result
from backend.errors import bad_request


def init_context(context):
    """Load the model once per worker into ``context.user_data``."""
    context.user_data.segmenter = shared_segmenter()
    context.logger.info("segmask interactor ready")


def _points(body: dict, key: str) -> list[list[float]]:
    """``body[key]`` as ``[[x, y], ...]`` finite pixel coordinates ([] when absent)."""
    value = body.get(key) or []
    ok = isinstance(value, list) and all(
        isinstance(p, list | tuple)
        and len(p) == 2
        and all(isinstance(v, int | float) and math.isfinite(v) for v in p)
        for p in value
    )
    if not ok:
        raise bad_request(f"'{key}' must be a list of [x, y] pixel points")
    return [[float(x), float(y)] for x, y in value]


def handler(context, event):
    def answer(body: dict) -> dict:
        pos, neg, corners = (
            _points(body, "pos_points"),
            _points(body, "neg_points"),
            _points(body, "obj_bbox"),
        )
        if len(corners) not in (0, 2):
            raise bad_request("'obj_bbox' must be [] or [[x1, y1], [x2, y2]]")
        box = [*corners[0], *corners[1]] if corners else None
        if not pos and box is None:
            raise bad_request("at least one positive point (or a box) is needed")
        image = decode_base64_image(body.get("image"), max_base64_chars())
        mask = context.user_data.segmenter.segment(image, pos, neg, box)
        return nuclio_interaction_result(mask)

    return serve(context, event, answer)
