"""Label Studio's side of the protocol: label configs, smart-tool contexts -> prompts, objects -> regions.

Coordinates: Label Studio regions and contexts are in percent of the original image width/height
(``x`` right, ``y`` down, top-left origin); prompts leave this module in percent too and become pixels only
once the worker knows the decoded image's size. Rectangles are ``x, y, width, height`` in percent with a
rotation in degrees about their top-left corner (backend.ls_geometry); prompts carry the axis-aligned boxes
around them as ``[x1, y1, x2, y2]`` percent.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from label_studio_sdk.label_interface import LabelInterface

from backend.errors import bad_request
from backend.label_mapping import class_to_label
from backend.ls_geometry import rectangle_percent_box
from backend.prompt_limits import MAX_PROMPT_POINTS, check_prompt_size

OUTPUT_TYPES = ("PolygonLabels", "BrushLabels")
SMART_TYPES = {"keypointlabels": "KeyPointLabels", "rectanglelabels": "RectangleLabels"}
# Parsed configs cached, and the longest config cached: a parsed config takes ~60x its text (64 configs of
# 1 MB took 3.8 GB), so the cache holds at most ~60 MB; real configs are a few KB.
CONFIG_CACHE_SIZE = 16
# Context items parsed at all (points of other labels and images are parsed, then ignored).
MAX_CONTEXT_ITEMS = 4 * MAX_PROMPT_POINTS
MAX_CACHED_CONFIG_CHARS = 64 * 1024


@dataclass(frozen=True)
class OutputControl:
    """Where suggestions go: a PolygonLabels (preferred) or BrushLabels control on one image.

    ``class_to_label`` maps lower-cased model class names to this control's labels: a ``<Label>``'s
    ``predicted_values`` attribute (comma-separated model classes) first, then a case-insensitive name match.
    """

    name: str
    to_name: str
    type: str
    labels: tuple[str, ...]
    class_to_label: dict[str, str] = field(hash=False, compare=False)

    @property
    def result_type(self) -> str:
        return self.type.lower()


@dataclass(frozen=True)
class ProjectConfig:
    """A parsed labelling config: its image objects (name -> task data key) and output controls."""

    interface: LabelInterface = field(hash=False, compare=False)
    images: dict[str, str] = field(hash=False)
    outputs: dict[str, OutputControl] = field(hash=False)

    def output_for(self, to_name: str) -> OutputControl:
        """The output control for image ``to_name``; a 400 when the config has none."""
        try:
            return self.outputs[to_name]
        except KeyError:
            raise bad_request(
                f"the labelling config has no PolygonLabels or BrushLabels control for image '{to_name}'",
                "unsupported_config",
            ) from None

    def image_url(self, task: dict, to_name: str) -> str:
        """The image reference of ``task`` for image object ``to_name`` (``task['data'][key]``)."""
        key = self.images[to_name]
        data = task.get("data")
        if not isinstance(data, dict) or not isinstance(data.get(key), str) or not data[key]:
            raise bad_request(f"task {task.get('id')} has no image URL in data['{key}']", "missing_image")
        return data[key]


def parse_config(xml: str) -> ProjectConfig:
    """Parse a labelling config; the last :data:`CONFIG_CACHE_SIZE` of at most
    :data:`MAX_CACHED_CONFIG_CHARS` characters are cached (Label Studio sends the same one with every
    request), longer ones are parsed every time."""
    if isinstance(xml, str) and len(xml) <= MAX_CACHED_CONFIG_CHARS:
        return _parse_config_cached(xml)
    return _parse_config(xml)


def _parse_config(xml: str) -> ProjectConfig:
    if not isinstance(xml, str) or not xml.strip():
        raise bad_request("label_config is missing or empty", "missing_label_config")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises lxml, KeyError and its own errors for bad XML
        raise bad_request(f"label_config cannot be parsed: {exc}", "bad_label_config") from exc
    images = {
        obj.name: obj.value.lstrip("$")
        for obj in interface.objects
        if obj.tag == "Image" and isinstance(obj.value, str) and obj.value.startswith("$")
    }
    outputs: dict[str, OutputControl] = {}
    for wanted in OUTPUT_TYPES:
        for control in interface.controls:
            if control.tag != wanted:
                continue
            for to_name in control.to_name:
                if to_name in images and to_name not in outputs:
                    outputs[to_name] = _output_control(control, to_name)
    return ProjectConfig(interface, images, outputs)


_parse_config_cached = functools.lru_cache(maxsize=CONFIG_CACHE_SIZE)(_parse_config)


def _output_control(control, to_name: str) -> OutputControl:
    mapping = class_to_label(
        (value, (tag.attr or {}).get("predicted_values")) for value, tag in control.labels_attrs.items()
    )
    return OutputControl(control.name, to_name, control.tag, tuple(control.labels), mapping)


@dataclass(frozen=True)
class Prompt:
    """What the annotator asked for with a smart tool, in percent of the image.

    ``points``: ``[(x, y), ...]`` percent; ``positive``: one bool per point; ``box``: ``[x1, y1, x2, y2]``
    percent or None; ``label``: the label chosen on the smart tool; ``to_name``: the image it was drawn on.
    """

    to_name: str
    label: str
    points: tuple[tuple[float, float], ...]
    positive: tuple[bool, ...]
    box: tuple[float, float, float, float] | None

    def to_json(self) -> dict:
        return {"points": [list(p) for p in self.points], "positive": list(self.positive), "box": self.box}


def prompt_from_context(context: object, config: ProjectConfig) -> Prompt:
    """Turn ``params.context`` of an interactive /predict into a :class:`Prompt`.

    Label Studio sends every smart point of the current label so far (``is_positive`` false for Alt+click)
    and/or the smart rectangle. The last smart item decides the image and the label; items on other images
    or with other labels are ignored, as Label Studio shows them as separate objects.
    """
    if not isinstance(context, dict) or not isinstance(context.get("result"), list):
        raise bad_request("params.context must be an object with a 'result' list", "bad_context")
    if len(context["result"]) > MAX_CONTEXT_ITEMS:
        raise bad_request(
            f"params.context.result holds {len(context['result'])} items; at most {MAX_CONTEXT_ITEMS} are "
            "accepted",
            "too_many_points",
        )
    items = [_smart_item(item, n) for n, item in enumerate(context["result"])]
    items = [it for it in items if it is not None]
    if not items:
        raise bad_request(
            "params.context.result holds no smart keypoint or rectangle (types keypointlabels, "
            "rectanglelabels)",
            "bad_context",
        )
    last = items[-1]
    to_name, label = last["to_name"], last["label"]
    if to_name not in config.images:
        raise bad_request(f"context refers to image '{to_name}', which the labelling config does not have")
    _check_label(config, last)
    chosen = [it for it in items if it["to_name"] == to_name and it["label"] == label]
    points = tuple(it["point"] for it in chosen if "point" in it)
    check_prompt_size(len(points))
    positive = tuple(it["positive"] for it in chosen if "point" in it)
    boxes = [it["box"] for it in chosen if "box" in it]
    return Prompt(to_name, label, points, positive, boxes[-1] if boxes else None)


def _check_label(config: ProjectConfig, item: dict) -> None:
    control = {c.name: c for c in config.interface.controls}.get(item["from_name"])
    if control is not None and item["label"] not in control.labels:
        raise bad_request(
            f"label '{item['label']}' is not a label of {control.tag} '{control.name}'", "unknown_label"
        )
    output = config.output_for(item["to_name"])
    if item["label"] not in output.labels:
        raise bad_request(
            f"label '{item['label']}' is not a label of {output.type} '{output.name}', where the "
            "suggestion would go",
            "unknown_label",
        )


def _smart_item(item: object, n: int) -> dict | None:
    """One context item as ``{to_name, from_name, label, point | box, positive}``; None if not smart."""
    if not isinstance(item, dict) or item.get("type") not in SMART_TYPES:
        return None
    value = item.get("value")
    where = f"params.context.result[{n}]"
    if not isinstance(value, dict):
        raise bad_request(f"{where}.value must be an object", "bad_context")
    labels = value.get(item["type"]) or value.get("labels")
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], str):
        raise bad_request(f"{where}.value.{item['type']} must be a non-empty list of labels", "bad_context")
    out = {"to_name": item.get("to_name"), "from_name": item.get("from_name"), "label": labels[0]}
    if not isinstance(out["to_name"], str):
        raise bad_request(f"{where}.to_name must be a string", "bad_context")
    if item["type"] == "keypointlabels":
        out["point"] = (_percent(value, "x", where), _percent(value, "y", where))
        out["positive"] = item.get("is_positive", True) is not False
    else:
        out["box"] = _rectangle_box(item, value, where)
    return out


def _finite(v: object) -> float | None:
    """``v`` as a float if it is a finite JSON number (not a bool, NaN, Infinity or too large), else None."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        number = float(v)
    except OverflowError:  # an integer beyond float's range
        return None
    return number if math.isfinite(number) else None


def _percent(value: dict, key: str, where: str, low: float = -1.0, high: float = 101.0) -> float:
    v = value.get(key)
    number = _finite(v)
    if number is None or not low <= number <= high:
        raise bad_request(
            f"{where}.value.{key} must be a number of percent in [0, 100], got {v!r:.40}", "bad_context"
        )
    return number


def _rectangle_box(item: dict, value: dict, where: str) -> tuple[float, float, float, float]:
    """Axis-aligned ``[x1, y1, x2, y2]`` percent around a (possibly rotated) rectangle context item."""
    x, y = _percent(value, "x", where), _percent(value, "y", where)
    w, h = _percent(value, "width", where, 0.0), _percent(value, "height", where, 0.0)
    if w <= 0 or h <= 0:
        raise bad_request(f"{where}: the rectangle has no area", "bad_context")
    rotation = _rotation(value, where)
    size = _image_size(item, where) if rotation else None
    return rectangle_percent_box(x, y, w, h, rotation, size)


def _image_size(item: dict, where: str) -> tuple[float, float]:
    """``(original_width, original_height)`` of a context item, pixels; a 400 unless both are positive."""
    width, height = _finite(item.get("original_width")), _finite(item.get("original_height"))
    if width is None or height is None or width <= 0 or height <= 0:
        raise bad_request(
            f"{where}.original_width and original_height must be positive numbers of pixels for a rotated "
            "rectangle",
            "bad_context",
        )
    return width, height


def _rotation(value: dict, where: str) -> float:
    """A rectangle's ``rotation`` in degrees (absent or null: 0); a 400 unless it is a finite number."""
    v = value.get("rotation")
    number = 0.0 if v is None else _finite(v)
    if number is None:
        raise bad_request(
            f"{where}.value.rotation must be a finite number of degrees, got {v!r:.40}", "bad_context"
        )
    return number


def polygon_region(
    output: OutputControl, label: str, points_pct: list, size: tuple[int, int], score: float
) -> dict:
    """A ``polygonlabels`` result: ``points_pct`` ``[[x%, y%], ...]``; ``size`` is ``(width, height)``."""
    return {
        **_region_head(output, size, score),
        "value": {"points": points_pct, "closed": True, "polygonlabels": [label]},
    }


def brush_region(
    output: OutputControl, label: str, rle: list[int], size: tuple[int, int], score: float
) -> dict:
    """A ``brushlabels`` result carrying Label Studio's RLE of the mask (backend.mask_encoding.brush_rle)."""
    return {
        **_region_head(output, size, score),
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
    }


def _region_head(output: OutputControl, size: tuple[int, int], score: float) -> dict:
    return {
        "from_name": output.name,
        "to_name": output.to_name,
        "type": output.result_type,
        "original_width": int(size[0]),
        "original_height": int(size[1]),
        "image_rotation": 0,
        "score": round(float(score), 4),
    }


def object_region(output: OutputControl, label: str, obj: dict, size: tuple[int, int]) -> dict | None:
    """A region for one object of a job result (``{"score", "polygon" | "rle"}``), or None when empty."""
    if output.type == "BrushLabels":
        return brush_region(output, label, obj["rle"], size, obj["score"]) if obj.get("rle") else None
    return polygon_region(output, label, obj["polygon"], size, obj["score"]) if obj.get("polygon") else None


def prediction(results: list[dict], model_version: str) -> dict:
    """One task's prediction; its ``score`` is the mean of its regions' scores (0 when there are none)."""
    score = sum(r["score"] for r in results) / len(results) if results else 0.0
    return {"result": results, "score": round(score, 4), "model_version": model_version}


def detections_prediction(result: dict, output: OutputControl) -> dict:
    """A pre-annotation job's result as one task's prediction: each object's model class mapped onto the
    control's labels (:attr:`OutputControl.class_to_label`), unmapped classes dropped."""
    size = (result["width"], result["height"])
    regions = []
    for obj in result["objects"]:
        label = output.class_to_label.get(obj["label"].lower())
        region = object_region(output, label, obj, size) if label else None
        if region:
            regions.append(region)
    return prediction(regions, result["model_version"])
