"""End to end with a real Label Studio 1.23.2: our backend (gunicorn + Redis/RQ worker, Basic auth) is
connected as a project's ML backend; Label Studio retrieves predictions for imported COCO128 images and
asks for a region interactively, exactly as its UI does."""

import uuid

import pytest
import requests
from ls_bodies import captured, interior_point
from rq_worker import REDIS_URL, require_redis, start_server, start_worker, stop

pytestmark = pytest.mark.e2e

AUTH = ("labelstudio", "backend-secret")
IMAGES = {42: "dog", 74: "dog"}  # COCO train2017 ids -> an object the image shows
CONFIG = captured("setup")["schema"]
MAX_DETECTIONS = 3


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """``segmask serve`` (gunicorn) with one ``segmask worker`` on a private queue prefix."""
    require_redis()
    logs = tmp_path_factory.mktemp("backend")
    prefix = f"segmask-e2e-{uuid.uuid4().hex[:6]}"
    worker = start_worker(REDIS_URL, prefix, logs / "worker.log")
    server, url = start_server(
        {
            "SEGMASK_REDIS_URL": REDIS_URL,
            "SEGMASK_QUEUE_PREFIX": prefix,
            "SEGMASK_BASIC_AUTH_USER": AUTH[0],
            "SEGMASK_BASIC_AUTH_PASS": AUTH[1],
            # The best three per image whatever their probability of being right (the calibrated default
            # shows only likely-right ones: none on some images), so that each image shows its polygons and
            # each dog is among them.
            "SEGMASK_SCORE_THRESHOLD": "0",
            "SEGMASK_MAX_DETECTIONS": str(MAX_DETECTIONS),
        },
        logs / "serve.log",
        auth=AUTH,
    )
    yield url
    stop(server)
    stop(worker)


@pytest.fixture(scope="module")
def project(label_studio, backend, coco128):
    """A project with the captured config, two COCO128 images imported and our backend connected."""
    project_id = label_studio.create_project("segmask e2e", CONFIG)
    files = [coco128 / "images" / f"{image_id:012d}.jpg" for image_id in IMAGES]
    task_ids = label_studio.import_images(project_id, files)
    ml_id = label_studio.connect_ml_backend(project_id, backend, auth=AUTH)
    return project_id, dict(zip(IMAGES, task_ids, strict=True)), ml_id


def test_the_backend_connects_and_label_studio_shows_our_model_version(label_studio, backend, project):
    _, _, ml_id = project
    version = requests.post(f"{backend}/setup", json={}, auth=AUTH).json()["model_version"]
    state = label_studio.ml_backend(ml_id)
    assert state["readable_state"] == "Connected" and state["model_version"] == version


def test_retrieved_predictions_are_stored_as_labelled_polygons_with_our_model_version(
    label_studio, backend, project
):
    project_id, tasks, _ = project
    version = requests.post(f"{backend}/setup", json={}, auth=AUTH).json()["model_version"]
    label_studio.retrieve_predictions(project_id, list(tasks.values()))
    for image_id, task_id in tasks.items():
        [stored] = label_studio.predictions(task=task_id)
        assert stored["model_version"] == version
        regions = stored["result"]
        assert 1 <= len(regions) <= MAX_DETECTIONS, f"{len(regions)} regions stored for COCO image {image_id}"
        for region in regions:
            assert (region["from_name"], region["to_name"], region["type"]) == (
                "polygon",
                "image",
                "polygonlabels",
            )
            assert region["value"]["polygonlabels"][0] in {"person", "dog", "car"}
            points = region["value"]["points"]
            assert len(points) >= 3 and all(0 <= c <= 100 for p in points for c in p)
        assert IMAGES[image_id] in {r["value"]["polygonlabels"][0] for r in regions}


def test_a_smart_click_through_label_studio_returns_the_object_as_a_polygon(label_studio, project, coco128):
    _, tasks, ml_id = project
    x, y, _ = interior_point(coco128, 42, "dog")
    context = captured("predict-interactive-keypoint")["params"]["context"]
    item = context["result"][0]
    item["value"].update(x=x, y=y, labels=["dog"], keypointlabels=["dog"])
    item.update(original_width=640, original_height=478)
    answer = label_studio.interactive_annotating(ml_id, tasks[42], context)
    assert "errors" not in answer, answer
    [region] = answer["data"]["result"]
    assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == ["dog"]
    xs = [p[0] for p in region["value"]["points"]]
    ys = [p[1] for p in region["value"]["points"]]
    assert min(xs) < x < max(xs) and min(ys) < y < max(ys)
