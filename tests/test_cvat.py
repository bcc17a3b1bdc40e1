"""CVAT integration through CVAT's own code (cvat-sdk/cvat-cli 2.80.0, nuclio-sdk), no CVAT server: the CLI's
function loader, the SDK driver's validation and label remapping, annotate_task, the agent interaction driver,
and the nuclio handlers run by nuclio-sdk's test platform, on a real COCO image."""

from __future__ import annotations

import base64
import concurrent.futures
import importlib.util
import io
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import cvat_sdk.auto_annotation as cvataa
import cvat_sdk.models as models
import numpy as np
import PIL.Image
import pytest
import yaml
from cvat_cli._internal import agent_driver
from cvat_cli._internal.agent_driver_interaction import AgentInteractionFunctionDriver
from cvat_cli._internal.common import FunctionLoader
from cvat_sdk.auto_annotation import driver
from cvat_sdk.masks import decode_mask
from nuclio_sdk import Event
from nuclio_sdk.test import Platform

from backend.cvat.runtime import Segmenter, label_plan, shared_segmenter, shared_settings
from backend.label_mapping import class_to_label
from backend.settings import DEFAULT_DATA_DIR

ROOT = Path(__file__).resolve().parents[1]
CVAT_DIR = ROOT / "backend" / "cvat"
IMAGE_PATH = DEFAULT_DATA_DIR / "images" / "000000000042.jpg"  # a big dog, 640x478
DOG_CLICK = (390.0, 160.0)
# Low enough for several detections on the dog image (the calibrated default, 0.5, shows none there: the dog
# is 0.34), so that the tests below see masks and labels go through; STRICT keeps the dog alone.
THRESHOLD, STRICT = 0.05, 0.3


@pytest.fixture(scope="module")
def image() -> PIL.Image.Image:
    return PIL.Image.open(IMAGE_PATH).convert("RGB")


@pytest.fixture(scope="module")
def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


@pytest.fixture(scope="module")
def detection_fn():
    return FunctionLoader(None, CVAT_DIR / "segmask_cvat.py", {}).load()


@pytest.fixture(scope="module")
def interaction_fn():
    return FunctionLoader(None, CVAT_DIR / "segmask_cvat_interactive.py", {}).load()


@pytest.fixture(scope="module")
def reference(pixels):
    """What the predictor itself returns for the image at :data:`THRESHOLD`."""
    return shared_segmenter().detect(pixels, THRESHOLD)


def context(conv_mask_to_poly: bool, conf_threshold: float | None = None):
    return driver._DetectionFunctionContextImpl(
        frame_name="000000000042.jpg", conf_threshold=conf_threshold, conv_mask_to_poly=conv_mask_to_poly
    )


def task_labels(*names: str, type: str = "any") -> list[models.Label]:
    return [
        models.Label(name=n, id=100 + i, type=type, attributes=[], sublabels=[]) for i, n in enumerate(names)
    ]


# ---- label mapping ----------------------------------------------------------------------------------------
def test_cvat_label_plan_uses_the_label_studio_mapping_rule():
    classes = ["person", "car", "truck", "dog"]
    plan = label_plan(classes, "Vehicle=car, truck;Person;Cat")
    assert plan.names == ("Vehicle", "Person", "Cat")
    assert plan.class_ids == {"car": 0, "truck": 0, "person": 1}
    assert class_to_label([("Vehicle", "car, truck"), ("Person", None), ("Cat", "")]) == {
        "car": "Vehicle",
        "truck": "Vehicle",
        "person": "Person",
        "vehicle": "Vehicle",
        "cat": "Cat",
    }
    default = label_plan(classes)
    assert default.names == tuple(classes) and default.label_id("Dog") == 3


# ---- cvat-sdk function modules ----------------------------------------------------------------------------
def test_cli_function_loader_loads_both_modules(detection_fn, interaction_fn):
    labels = detection_fn.spec.labels
    assert isinstance(detection_fn.spec, cvataa.DetectionFunctionSpec)
    assert [label.id for label in labels] == list(range(80)) and {label.type for label in labels} == {"mask"}
    assert labels[16].name == "dog"
    assert interaction_fn.spec == cvataa.InteractionFunctionSpec(
        min_pos_points=1, min_neg_points=0, min_bounding_boxes=0
    )


@pytest.mark.slow
def test_masks_pass_the_drivers_validation_and_remapping_and_decode_exactly(
    detection_fn, image, pixels, reference
):
    shapes = detection_fn.detect(context(False, conf_threshold=THRESHOLD), image)
    assert [s.type.value for s in shapes] == ["mask"] * len(reference) and len(reference) >= 2
    for shape, det in zip(shapes, reference, strict=True):
        decoded = decode_mask(shape.points, image_width=pixels.shape[1], image_height=pixels.shape[0])
        assert np.array_equal(decoded, det.mask)
    ds = task_labels(*{d.label for d in reference})
    mapper = driver._AnnotationMapper(
        logging.getLogger("test"),
        detection_fn.spec.labels,
        ds,
        allow_unmatched_labels=True,
        conv_mask_to_poly=False,
    )
    _, remapped = mapper.validate_and_remap(shapes, 7)
    by_name = {label.name: label.id for label in ds}
    assert [s.label_id for s in remapped] == [by_name[d.label] for d in reference]
    assert {(s.frame, s.source) for s in remapped} == {(7, "auto")}


@pytest.mark.slow
def test_polygons_when_asked_pass_the_drivers_validation(detection_fn, image):
    shapes = detection_fn.detect(context(True, conf_threshold=STRICT), image)
    assert shapes and {s.type.value for s in shapes} == {"polygon"}
    assert all(len(s.points) >= 6 and len(s.points) % 2 == 0 for s in shapes)
    mapper = driver._AnnotationMapper(
        logging.getLogger("test"),
        detection_fn.spec.labels,
        task_labels("dog", type="polygon"),
        allow_unmatched_labels=True,
        conv_mask_to_poly=True,
    )
    _, remapped = mapper.validate_and_remap(shapes, 0)
    assert remapped and {s.label_id for s in remapped} == {100}


class FakeTaskDataset:
    """A local one-frame dataset in TaskDataset's shape (labels, samples with media.load_image())."""

    def __init__(self, image: PIL.Image.Image, labels: list[models.Label]) -> None:
        self.labels = labels
        media = SimpleNamespace(load_image=lambda: image.copy())
        self.samples = [SimpleNamespace(frame_index=3, frame_name="000000000042.jpg", media=media)]


@pytest.mark.slow
def test_annotate_task_uploads_the_expected_payload(detection_fn, image, reference, monkeypatch):
    labels = task_labels("dog", "chair", type="mask")
    monkeypatch.setattr(driver, "TaskDataset", lambda client, task_id, **kw: FakeTaskDataset(image, labels))
    uploads = []
    api = SimpleNamespace(
        update_annotations=lambda task_id, labeled_data_request: uploads.append(
            (task_id, labeled_data_request)
        )
    )
    client = SimpleNamespace(logger=logging.getLogger("test"), tasks=SimpleNamespace(api=api))
    cvataa.annotate_task(
        client, 12, detection_fn, clear_existing=True, allow_unmatched_labels=True, conf_threshold=THRESHOLD
    )
    ((task_id, payload),) = uploads
    expected = [{"dog": 100, "chair": 101}[d.label] for d in reference if d.label in ("dog", "chair")]
    assert task_id == 12 and payload.tags == []
    assert [(s.label_id, s.frame, s.type.value, s.source) for s in payload.shapes] == [
        (label_id, 3, "mask", "auto") for label_id in expected
    ]


class InlineExecutor:
    """Runs the agent's worker jobs in this process (the agent uses a one-process pool)."""

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future

    def result(self, future: concurrent.futures.Future):
        return future.result()


def test_agent_interaction_driver_accepts_one_mask_and_reuses_the_image(
    interaction_fn, image, pixels, monkeypatch
):
    agent_driver.set_worker_current_function(interaction_fn)
    AgentInteractionFunctionDriver.init_worker(None)
    loads = []

    def dataset(client, task_id, **kw):
        loads.append(task_id)
        return FakeTaskDataset(image, [])

    monkeypatch.setattr(agent_driver.cvatds, "TaskDataset", dataset)
    drv = AgentInteractionFunctionDriver(None, InlineExecutor(), interaction_fn.spec)
    ar = {
        "type": "interact",
        "task": 5,
        "frame": 3,
        "pos_points": [list(DOG_CLICK)],
        "neg_points": [],
        "obj_bbox": [],
    }
    first = drv.calculate_result_for_ar(ar, None)
    again = drv.calculate_result_for_ar({**ar, "neg_points": [[250.0, 270.0]]}, None)
    assert loads == [5]  # the second click used the agent's cached preprocessed image
    for result, neg in ((first, []), (again, [[250.0, 270.0]])):
        (shape,) = result["shapes"]
        assert shape["type"] == "mask"
        decoded = decode_mask(shape["points"], image_width=pixels.shape[1], image_height=pixels.shape[0])
        assert np.array_equal(decoded, shared_segmenter().segment(pixels, [DOG_CLICK], neg))
        assert decoded[int(DOG_CLICK[1]), int(DOG_CLICK[0])]


def test_interactor_spec_matches_the_nuclio_interactor_as_cvat_would_register_it(interaction_fn):
    notes = yaml.safe_load((CVAT_DIR / "nuclio/interactor/function.yaml").read_text())["metadata"][
        "annotations"
    ]
    remote = {
        "min_pos_points": int(notes["min_pos_points"]),
        "min_neg_points": int(notes["min_neg_points"]),
        "startswith_box": notes["startswith_box"] == "true",
        "startswith_box_optional": notes["startswith_box_optional"] == "true",
    }
    AgentInteractionFunctionDriver(
        None, InlineExecutor(), interaction_fn.spec
    ).validate_function_compatibility(remote)
    assert AgentInteractionFunctionDriver.get_remote_function_fields(interaction_fn.spec) == {
        "min_pos_points": 1,
        "min_neg_points": 0,
        "startswith_box_optional": True,
    }
    assert notes["version"] == 2 and notes["type"] == "interactor"


# ---- nuclio functions -------------------------------------------------------------------------------------
def load_main(kind: str):
    """Import backend/cvat/nuclio/<kind>/main.py as its own module (nuclio imports it as `main`)."""
    name = f"segmask_nuclio_{kind}"
    spec = importlib.util.spec_from_file_location(name, CVAT_DIR / "nuclio" / kind / "main.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def platform() -> Platform:
    return Platform()


@pytest.fixture(scope="module")
def image_b64() -> str:
    return base64.b64encode(IMAGE_PATH.read_bytes()).decode()


@pytest.fixture(scope="module")
def handlers() -> dict:
    return {kind: load_main(kind).handler for kind in ("detector", "interactor")}


def call(platform: Platform, handler, body: dict) -> tuple[int, object]:
    """Run a nuclio handler on a JSON body the way nuclio does (init_context first): (status, JSON body)."""
    response = platform.call_handler(handler, Event(body=body))
    assert response.content_type == "application/json"
    return response.status_code, json.loads(response.body)


def crop_to_mask(crop: np.ndarray, box: list[int], height: int, width: int) -> np.ndarray:
    """A crop of the inclusive box ``[xtl, ytl, xbr, ybr]`` pasted into a full ``(height, width)`` mask."""
    mask = np.zeros((height, width), dtype=bool)
    mask[box[1] : box[3] + 1, box[0] : box[2] + 1] = crop.astype(bool)
    return mask


@pytest.mark.slow
def test_nuclio_detector_returns_mask_items_that_decode_to_the_predictors_masks(
    platform, handlers, image_b64, pixels, reference
):
    status, items = call(platform, handlers["detector"], {"image": image_b64, "threshold": THRESHOLD})
    assert status == 200 and [i["label"] for i in items] == [d.label for d in reference]
    height, width = pixels.shape[:2]
    for item, det in zip(items, reference, strict=True):
        assert item["type"] == "mask" and item["attributes"] == []
        assert isinstance(item["confidence"], str) and float(item["confidence"]) == pytest.approx(
            det.score, abs=1e-4
        )
        assert len(item["points"]) >= 6 and len(item["points"]) % 2 == 0
        box = item["mask"][-4:]
        crop = np.array(item["mask"][:-4]).reshape(box[3] - box[1] + 1, box[2] - box[0] + 1)
        assert np.array_equal(crop_to_mask(crop, box, height, width), det.mask)
    status, strict_items = call(platform, handlers["detector"], {"image": image_b64, "threshold": STRICT})
    assert status == 200 and len(strict_items) == sum(d.score >= STRICT for d in reference) >= 1


def test_nuclio_interactor_returns_one_object_with_mask_bounds_and_points(
    platform, handlers, image_b64, pixels
):
    body = {"image": image_b64, "pos_points": [list(DOG_CLICK)], "neg_points": [[250, 270]], "obj_bbox": []}
    status, result = call(platform, handlers["interactor"], body)
    assert status == 200 and isinstance(result, dict) and set(result) == {"mask", "bounds", "points"}
    expected = shared_segmenter().segment(pixels, [DOG_CLICK], [[250, 270]])
    height, width = pixels.shape[:2]
    assert np.array_equal(crop_to_mask(np.array(result["mask"]), result["bounds"], height, width), expected)
    assert len(result["points"]) >= 3 and all(len(p) == 2 for p in result["points"])
    status, boxed = call(
        platform,
        handlers["interactor"],
        {"image": image_b64, "pos_points": [], "neg_points": [], "obj_bbox": [[214, 37], [568, 282]]},
    )
    assert status == 200 and boxed["bounds"][0] >= 200 and boxed["bounds"][2] <= 580


def test_nuclio_handlers_refuse_oversized_and_bad_images_with_json(platform, handlers, monkeypatch):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 48), (120, 30, 200)).save(buffer, "PNG")
    small = base64.b64encode(buffer.getvalue()).decode()
    monkeypatch.setenv("SEGMASK_MAX_BASE64_CHARS", str(len(small) - 1))
    for kind in ("detector", "interactor"):
        status, error = call(platform, handlers[kind], {"image": small, "pos_points": [[10, 10]]})
        assert (status, error["error"]) == (413, "image_too_large") and "SEGMASK_MAX_BASE64_CHARS" in error[
            "message"
        ]
    monkeypatch.delenv("SEGMASK_MAX_BASE64_CHARS")
    not_an_image = base64.b64encode(b"GIF89a but not really").decode()
    for kind in ("detector", "interactor"):
        for body in (
            {"pos_points": [[1, 1]]},
            {"image": "%%% not base64", "pos_points": [[1, 1]]},
            {"image": not_an_image, "pos_points": [[1, 1]]},
        ):
            status, error = call(platform, handlers[kind], body)
            assert status == 400 and error["error"] in ("missing_image", "bad_image"), (kind, body, error)
    status, error = call(
        platform, handlers["interactor"], {"image": small, "pos_points": [], "neg_points": [[1, 1]]}
    )
    assert status == 400 and "positive point" in error["message"]


def test_nuclio_detector_spec_lists_the_models_classes_as_masks(detection_fn):
    for name in ("function.yaml", "function-gpu.yaml"):
        config = yaml.safe_load((CVAT_DIR / "nuclio/detector" / name).read_text())
        spec = json.loads(config["metadata"]["annotations"]["spec"])
        assert [(s["id"], s["name"], s["type"]) for s in spec] == [
            (lb.id, lb.name, "mask") for lb in detection_fn.spec.labels
        ]
        assert config["spec"]["eventTimeout"] == "120s"
    gpu = yaml.safe_load((CVAT_DIR / "nuclio/interactor/function-gpu.yaml").read_text())["spec"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "SEGMASK_DEVICE", "value": "cuda"} in gpu["env"]


def test_an_interaction_of_more_points_than_the_limit_is_a_400(pixels):
    from backend.errors import ServiceError
    from backend.prompt_limits import MAX_PROMPT_POINTS

    with pytest.raises(ServiceError) as raised:
        shared_segmenter().segment(pixels, [DOG_CLICK] * MAX_PROMPT_POINTS, [[250.0, 270.0]])
    assert raised.value.status == 400 and raised.value.kind == "too_many_points"


def test_features_reused_across_clicks_are_measured_as_they_grow(pixels):
    segmenter = Segmenter(shared_settings())  # its own cache: these two images only
    features = segmenter.image_features(pixels)  # what the agent keeps for every click on this image
    segmenter.segment(features, [DOG_CLICK])
    other = pixels[:64, :64].copy()
    segmenter.segment(other, [[10.0, 10.0]])  # another image's request trims the cache
    segmenter.segment(features, [DOG_CLICK], [[250.0, 270.0]])  # the first image's features grow
    assert segmenter.features.nbytes == features.nbytes + segmenter.image_features(other).nbytes
