"""The Label Studio protocol served in embedded mode: real model, real HTTP image server, captured bodies."""

import base64
import copy
import time

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from ls_bodies import interior_point, keypoints, rectangle, with_image
from upload_server import UPLOAD_TOKEN

from backend.app import create_app
from backend.ls_geometry import percent_to_points
from backend.settings import Settings
from segmodels.checkpoint_files import checkpoint_version
from segmodels.geometry import mask_iou, polygon_to_mask

DOG_IMAGE = 42  # one large dog (COCO train2017 000000000042.jpg, a training image)


@pytest.fixture(scope="module")
def app(upload_server):
    return create_app(Settings.from_env({}))


@pytest.fixture(scope="module")
def client(app, upload_server, ls_request):
    client = app.test_client()
    setup = dict(ls_request("setup"), hostname=upload_server.url, access_token=UPLOAD_TOKEN)
    assert client.post("/setup", json=setup).status_code == 200
    return client


@pytest.fixture(scope="module")
def best_client(upload_server, ls_request):
    """Pre-annotation showing each image's best object whatever its probability (threshold 0, one per
    image): what the tests of routing model classes to project labels need. The default threshold shows
    only objects more likely right than wrong, and the dog below scores under it."""
    client = create_app(Settings.from_env({}, score_threshold=0.0, max_detections=1)).test_client()
    setup = dict(ls_request("setup"), hostname=upload_server.url, access_token=UPLOAD_TOKEN)
    assert client.post("/setup", json=setup).status_code == 200
    return client


@pytest.fixture(scope="module")
def dog(coco128):
    return interior_point(coco128, DOG_IMAGE, "dog")


def _region_mask(region: dict) -> np.ndarray:
    width, height = region["original_width"], region["original_height"]
    return polygon_to_mask(
        percent_to_points(np.array(region["value"]["points"]), width, height), height, width
    )


def test_health_is_up_and_names_the_mode(client):
    body = client.get("/health").get_json()
    assert body["status"] == "UP" and body["mode"] == "embedded"


def test_setup_returns_the_version_of_the_served_model(client, ls_request):
    answer = client.post("/setup", json=dict(ls_request("setup"), project="99.1795402219")).get_json()
    assert answer == {"model_version": checkpoint_version(Settings.from_env({}).model_dir)}


def test_a_click_returns_one_valid_polygon_on_the_polygon_control_with_the_chosen_label(
    client, ls_request, dog
):
    x, y, gt = dog
    body = keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(x, y, True)])
    answer = client.post("/predict", json=body)
    assert answer.status_code == 200, answer.get_json()
    [prediction] = answer.get_json()["results"]
    [region] = prediction["result"]
    assert (region["from_name"], region["to_name"], region["type"]) == ("polygon", "image", "polygonlabels")
    assert region["value"]["polygonlabels"] == ["dog"] and 0 <= region["score"] <= 1
    assert (region["original_width"], region["original_height"]) == (640, 478)
    assert prediction["model_version"] == client.post("/setup", json={}).get_json()["model_version"]
    assert LabelInterface(body["label_config"]).validate_prediction(prediction, return_errors=True) == []
    mask = _region_mask(region)
    assert (mask & gt).sum() / (mask | gt).sum() > 0.5


def test_repeated_clicks_on_an_image_reuse_its_features(app, client, ls_request, dog):
    x, y, _ = dog
    runtime = app.extensions["segmask"]["service"].dispatcher.runtime
    client.post(
        "/predict", json=keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(x, y, True)])
    )
    hits = runtime.features.hits
    body = keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(x, y, True), (x + 5, y, True)])
    assert client.post("/predict", json=body).status_code == 200
    assert runtime.features.hits == hits + 1


def test_a_click_on_an_image_with_cached_features_does_not_decode_it_again(
    app, client, ls_request, dog, monkeypatch
):
    x, y, _ = dog
    body = keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(x, y, True)])
    assert client.post("/predict", json=body).status_code == 200
    runtime = app.extensions["segmask"]["service"].dispatcher.runtime

    def no_decode(data: bytes) -> np.ndarray:
        raise AssertionError("a cached image was decoded again")

    monkeypatch.setattr(runtime.fetcher, "decode", no_decode)
    assert client.post("/predict", json=body).status_code == 200


def test_a_negative_click_removes_the_area_around_it(client, ls_request, dog):
    x, y, gt = dog
    base = keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(x, y, True)])
    before = _region_mask(client.post("/predict", json=base).get_json()["results"][0]["result"][0])
    # The negative goes well inside the first mask (8 px from its edge), as far from the positive as possible.
    inside = cv2.distanceTransform(before.astype(np.uint8), cv2.DIST_L2, 5) >= 8
    ys, xs = np.nonzero(inside)
    far = int(np.argmax((xs - x * 6.4) ** 2 + (ys - y * 4.78) ** 2))
    neg = ((xs[far] + 0.5) / 6.4, (ys[far] + 0.5) / 4.78, False)
    body = keypoints(ls_request("predict-interactive-keypoint-with-negative"), DOG_IMAGE, [(x, y, True), neg])
    after = _region_mask(client.post("/predict", json=body).get_json()["results"][0]["result"][0])
    near = (xs - xs[far]) ** 2 + (ys - ys[far]) ** 2 <= 8**2
    assert not after[ys[far], xs[far]]
    assert after[ys[near], xs[near]].mean() < 0.5
    assert mask_iou(after, gt) >= mask_iou(before, gt) - 0.05


def test_a_smart_rectangle_returns_a_polygon_inside_the_rectangle(client, ls_request, dog):
    _, _, gt = dog
    ys, xs = np.nonzero(gt)
    box = (xs.min() / 6.4, ys.min() / 4.78, (xs.max() - xs.min()) / 6.4, (ys.max() - ys.min()) / 4.78)
    body = rectangle(ls_request("predict-interactive-rectangle"), DOG_IMAGE, box)
    [region] = client.post("/predict", json=body).get_json()["results"][0]["result"]
    points = np.array(region["value"]["points"])
    assert region["value"]["polygonlabels"] == ["dog"]
    # The predictor lets masks pass the box edges by 2% of its size (boxes are drawn loosely); 1% more for
    # the polygon's simplification.
    mx, my = 0.03 * box[2], 0.03 * box[3]
    assert box[0] - mx <= points[:, 0].min() and points[:, 0].max() <= box[0] + box[2] + mx
    assert box[1] - my <= points[:, 1].min() and points[:, 1].max() <= box[1] + box[3] + my


BRUSH_CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="brush" toName="image"><Label value="dog"/></BrushLabels>
<KeyPointLabels name="keypoint" toName="image" smart="true"><Label value="dog" smart="true"/></KeyPointLabels>
</View>"""


def test_a_brush_only_project_gets_a_brush_rle_of_the_original_size(client, ls_request, dog):
    x, y, gt = dog
    body = keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(x, y, True)])
    body["label_config"] = BRUSH_CONFIG
    [region] = client.post("/predict", json=body).get_json()["results"][0]["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["dog"]
    mask = decode_rle(region["value"]["rle"]).reshape(478, 640, 4)[:, :, 3] > 0
    assert mask[int(y * 4.78), int(x * 6.4)]
    assert (
        LabelInterface(BRUSH_CONFIG).validate_prediction(
            {"result": [region], "model_version": "v"}, return_errors=True
        )
        == []
    )


def test_batch_gives_one_prediction_per_task_in_order_with_project_labels(best_client, ls_request):
    body = ls_request("predict-batch")
    body["tasks"][0]["data"]["image"] = "/data/upload/1/000000000042.jpg"
    body["tasks"][1]["data"]["image"] = "/data/upload/1/000000000009.jpg"
    answer = best_client.post("/predict", json=body)
    assert answer.status_code == 200, answer.get_json()
    results = answer.get_json()["results"]
    assert len(results) == 2
    labels = {r["value"]["polygonlabels"][0] for p in results for r in p["result"]}
    assert labels <= {"person", "dog", "car"}
    assert "dog" in {r["value"]["polygonlabels"][0] for r in results[0]["result"]}
    interface = LabelInterface(body["label_config"])
    assert all(interface.validate_prediction(p, return_errors=True) == [] for p in results)


def test_pre_annotation_shows_only_objects_more_likely_right_than_wrong(client, best_client, ls_request):
    body = with_image(ls_request("predict-batch"), DOG_IMAGE)
    best = best_client.post("/predict", json=body).get_json()["results"][0]["result"]
    shown = client.post("/predict", json=body).get_json()["results"][0]["result"]
    assert best and all(r["score"] < 0.5 for r in best) and shown == []


def test_batch_drops_classes_the_project_has_no_label_for(client, ls_request):
    body = with_image(ls_request("predict-batch"), DOG_IMAGE)
    body["label_config"] = body["label_config"].replace('value="dog"', 'value="hotdog"')
    results = client.post("/predict", json=body).get_json()["results"]
    assert all(r["value"]["polygonlabels"][0] != "hotdog" for p in results for r in p["result"])


def test_batch_shows_the_best_object_the_project_has_a_label_for(best_client, ls_request):
    """The image's best detection is the dog; without a dog label the one region shown is the best of
    the project's classes, not nothing."""
    body = with_image(ls_request("predict-batch"), DOG_IMAGE)
    body["label_config"] = body["label_config"].replace('value="dog"', 'value="hotdog"')
    for prediction in best_client.post("/predict", json=body).get_json()["results"]:
        assert [r["value"]["polygonlabels"][0] for r in prediction["result"]] in (["person"], ["car"])


def test_predicted_values_route_model_classes_to_a_project_label(best_client, ls_request):
    body = with_image(ls_request("predict-batch"), DOG_IMAGE)
    body["tasks"] = body["tasks"][:1]
    body["label_config"] = body["label_config"].replace(
        '<Label value="car"/>', '<Label value="Pet" predicted_values="dog,cat"/>'
    )
    [prediction] = best_client.post("/predict", json=body).get_json()["results"]
    assert "Pet" in {r["value"]["polygonlabels"][0] for r in prediction["result"]}


def test_webhook_answers_at_once_and_is_counted(client, ls_request):
    started = time.perf_counter()
    answer = client.post("/webhook", json=ls_request("webhook-annotation_created"))
    assert answer.status_code == 200 and time.perf_counter() - started < 1.0
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'segmask_webhook_events_total{action="ANNOTATION_CREATED"}' in metrics


def test_metrics_report_requests_errors_latency_and_model_version(client):
    client.post("/predict", data="{not json")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'segmask_errors_total{kind="malformed_json",route="/predict"}' in text
    assert "segmask_request_seconds_bucket" in text and 'route="/predict"' in text
    assert "segmask_model_info{version=" in text
    assert "segmask_redis_up" not in text  # embedded mode has no Redis to be up or down


@pytest.fixture(scope="module")
def guarded(app):
    settings = Settings.from_env({}, basic_auth_user="ls", basic_auth_pass="s3cret")
    return create_app(settings, dispatcher=app.extensions["segmask"]["service"].dispatcher).test_client()


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(
    "path, method", [("/health", "get"), ("/setup", "post"), ("/predict", "post"), ("/metrics", "get")]
)
def test_basic_auth_guards_every_route_but_the_webhook(guarded, path, method):
    answer = getattr(guarded, method)(path, json={}, headers=_basic("ls", "wrong"))
    assert answer.status_code == 401 and answer.get_json()["error"] == "unauthorized"


def test_basic_auth_lets_the_right_credentials_and_webhooks_through(guarded, ls_request):
    assert guarded.get("/health", headers=_basic("ls", "s3cret")).status_code == 200
    assert guarded.post("/webhook", json=ls_request("webhook-annotation_created")).status_code == 200


def test_a_failing_task_in_a_batch_gets_an_empty_prediction_and_the_others_are_served(
    best_client, ls_request
):
    body = with_image(ls_request("predict-batch"), DOG_IMAGE)
    body["tasks"][1]["data"]["image"] = "/data/upload/1/missing.jpg"
    results = best_client.post("/predict", json=body).get_json()["results"]
    assert len(results) == 2 and results[0]["result"] and results[1]["result"] == []


def test_the_setup_token_is_what_downloads_uploads(app, ls_request):
    fresh = create_app(Settings.from_env({}), dispatcher=app.extensions["segmask"]["service"].dispatcher)
    body = copy.deepcopy(ls_request("predict-interactive-keypoint"))
    body = keypoints(body, 9, [(50, 50, True)], label="person")
    body["project"] = "404.1795402219"  # a project that sent no /setup
    answer = fresh.test_client().post("/predict", json=body)
    assert answer.status_code == 400 and "Label Studio" in answer.get_json()["message"]


def test_the_train_button_without_a_model_store_is_a_clear_409(client, ls_request):
    answer = client.post("/webhook", json=ls_request("webhook-start_training"))
    assert answer.status_code == 409 and "SEGMASK_MODEL_STORE" in answer.get_json()["message"]


def test_a_published_version_is_served_without_a_restart(tmp_path, upload_server, ls_request, dog):
    import shutil

    from segmodels.model_store import ModelStore

    settings = Settings.from_env({}, model_store=str(tmp_path / "store"))
    fresh = create_app(settings).test_client()
    fresh.post(
        "/setup", json=dict(ls_request("setup"), hostname=upload_server.url, access_token=UPLOAD_TOKEN)
    )
    body = keypoints(ls_request("predict-interactive-keypoint"), DOG_IMAGE, [(dog[0], dog[1], True)])
    assert fresh.post("/predict", json=body).get_json()["results"][0]["model_version"].startswith("default-")
    store = ModelStore(settings.model_store, settings.model_dir)
    with store.new_version() as staged:
        for name in ("model.safetensors", "model.json"):
            shutil.copy(settings.model_dir / name, staged.path / name)
    store.publish(staged.name, "test")
    assert fresh.post("/setup", json={}).get_json()["model_version"] == "v1"
    assert fresh.post("/predict", json=body).get_json()["results"][0]["model_version"] == "v1"
    assert [v["version"] for v in fresh.get("/versions").get_json()["versions"]][1:] == ["v1"]
