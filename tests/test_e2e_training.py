"""End to end, the retraining loop with a real Label Studio 1.23.2: annotations submitted through its API,
Train pressed through /api/ml/{id}/train, a worker fine-tunes and publishes a new version, Label Studio
re-requests predictions with it, the new label appears, unlabelled tasks get ranked predictions, and a
training job killed mid-way leaves the published version serving."""

import json
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
from rq_worker import REDIS_URL, require_redis, start_server, start_worker, stop

from segmodels.geometry import coco_segmentation_to_mask, mask_to_polygon

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# The model knows "dog"; this project calls dogs "puppy", a label the model has never seen.
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="polygon" toName="image"><Label value="person"/><Label value="puppy"/></PolygonLabels>
  <KeyPointLabels name="keypoint" toName="image" smart="true">
    <Label value="person" smart="true"/><Label value="puppy" smart="true"/>
  </KeyPointLabels>
</View>"""
ANNOTATED = (42, 74, 307, 394, 581)  # COCO128 images with dogs (and people)
UNLABELLED = (36,)
RENAME = {"dog": "puppy", "person": "person"}


def _gt_result(coco: dict, image_id: int) -> list[dict]:
    """The image's dogs and people (> 2000 px) as Label Studio polygon results, dogs labelled "puppy"."""
    image = next(im for im in coco["images"] if im["id"] == image_id)
    w, h = image["width"], image["height"]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    result = []
    for ann in coco["annotations"]:
        label = RENAME.get(names[ann["category_id"]])
        if ann["image_id"] != image_id or label is None or ann["area"] < 2000 or ann["iscrowd"]:
            continue
        polygon = mask_to_polygon(coco_segmentation_to_mask(ann["segmentation"], h, w))
        points = (polygon / np.array([w, h]) * 100).round(3).tolist()
        result.append(
            {
                "from_name": "polygon",
                "to_name": "image",
                "type": "polygonlabels",
                "original_width": w,
                "original_height": h,
                "value": {"points": points, "closed": True, "polygonlabels": [label]},
            }
        )
    return result


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`segmask serve` + an inference worker + a training worker sharing a model store."""
    require_redis()
    logs = tmp_path_factory.mktemp("training-stack")
    prefix = f"segmask-train-e2e-{uuid.uuid4().hex[:6]}"
    env = {"SEGMASK_MODEL_STORE": str(logs / "store"), "SEGMASK_RETRAIN_EVERY": "0"}
    inference = start_worker(REDIS_URL, prefix, logs / "worker.log", "interactive,batch", **env)
    training = start_worker(REDIS_URL, prefix, logs / "trainer.log", "training", **env)
    server, url = start_server(
        {**env, "SEGMASK_REDIS_URL": REDIS_URL, "SEGMASK_QUEUE_PREFIX": prefix}, logs / "serve.log"
    )
    state = {"url": url, "trainer": training, "logs": logs, "prefix": prefix, "env": env}
    yield state
    for proc in (server, inference, state["trainer"]):
        stop(proc)


@pytest.fixture(scope="module")
def project(label_studio, stack, coco128):
    coco = json.loads((coco128 / "instances.json").read_text())
    project_id = label_studio.create_project("segmask retraining e2e", CONFIG)
    ids = (*ANNOTATED, *UNLABELLED)
    task_ids = dict(
        zip(
            ids,
            label_studio.import_images(project_id, [coco128 / "images" / f"{i:012d}.jpg" for i in ids]),
            strict=True,
        )
    )
    ml_id = label_studio.connect_ml_backend(project_id, stack["url"])
    return {"id": project_id, "tasks": task_ids, "ml": ml_id, "coco": coco}


def _version(stack) -> str:
    return requests.post(f"{stack['url']}/setup", json={}).json()["model_version"]


def _wait_for_job(stack, project_id: int, done: set[str], timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {j["project"]: j for j in requests.get(f"{stack['url']}/jobs").json()["jobs"]}
        record = jobs.get(project_id, {})
        if record.get("state") in done:
            return record
        time.sleep(2)
    raise AssertionError(
        f"training did not reach {done}: {record}\n{(stack['logs'] / 'trainer.log').read_text()[-3000:]}"
    )


def test_training_on_annotations_publishes_a_version_that_label_studio_then_uses(
    label_studio, stack, project
):
    before = _version(stack)
    label_studio.retrieve_predictions(project["id"], [project["tasks"][42]])
    [old] = label_studio.predictions(task=project["tasks"][42])
    assert old["model_version"] == before
    assert "puppy" not in {r["value"]["polygonlabels"][0] for r in old["result"]}

    for image_id in ANNOTATED:
        label_studio.create_annotation(project["tasks"][image_id], _gt_result(project["coco"], image_id))
    label_studio.train(project["ml"])
    record = _wait_for_job(stack, project["id"], {"published", "kept", "failed"})
    assert record["state"] == "published", record
    assert _version(stack) == record["version"] == "v1"

    label_studio.retrieve_predictions(project["id"], [project["tasks"][42]])
    new = [p for p in label_studio.predictions(task=project["tasks"][42]) if p["model_version"] == "v1"]
    assert new, "Label Studio did not re-request predictions for the new version"
    assert "puppy" in {r["value"]["polygonlabels"][0] for r in new[0]["result"]}


def test_after_publishing_unlabelled_tasks_get_ranked_predictions(label_studio, stack, project):
    task = project["tasks"][UNLABELLED[0]]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ranked = [p for p in label_studio.predictions(task=task) if p["model_version"] == "v1"]
        if ranked:
            break
        time.sleep(2)
    assert ranked and 0.0 <= ranked[0]["score"] <= 1.0
    views = label_studio.request("GET", "/api/dm/views", params={"project": project["id"]}).json()
    assert "segmask: most uncertain first" in {(v.get("data") or {}).get("title") for v in views}


def test_a_version_keeps_its_data_snapshot_metrics_and_training_log(stack):
    [v1] = [v for v in requests.get(f"{stack['url']}/versions").json()["versions"] if v["version"] == "v1"]
    path = Path(v1["path"])
    snapshot = json.loads((path / "data" / "instances.json").read_text())
    assert {c["name"] for c in snapshot["categories"]} == {"person", "puppy"}
    assert v1["metrics"]["better_or_equal"] and "fine-tuned" in (path / "train.log").read_text()


def test_a_training_job_killed_mid_way_leaves_the_published_version_serving(label_studio, stack, project):
    label_studio.train(project["ml"])
    _wait_for_job(stack, project["id"], {"running"}, timeout=120)
    time.sleep(3)
    os.killpg(os.getpgid(stack["trainer"].pid), signal.SIGKILL)
    stack["trainer"].wait()
    record = requests.get(f"{stack['url']}/jobs").json()["jobs"]
    [mine] = [r for r in record if r["project"] == project["id"]]
    assert mine["state"] == "interrupted"
    assert _version(stack) == "v1"
    versions = requests.get(f"{stack['url']}/versions").json()
    assert [v["version"] for v in versions["versions"]][1:] == ["v1"]
    stack["trainer"] = start_worker(
        REDIS_URL, stack["prefix"], stack["logs"] / "trainer2.log", "training", **stack["env"]
    )
