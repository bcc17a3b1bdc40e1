"""Rescoring after a new version: every unlabelled task gets a prediction whose score, sorted ascending in
Label Studio (the README's instruction and the tab rescore creates), serves the most uncertain task first."""

from types import SimpleNamespace

from ls_bodies import captured

from backend.rescore import VIEW_TITLE, rescore
from backend.training import TrainRequest
from segmodels.predictor import DEFAULT_CHECKPOINT

# Per task image: the project-restricted uncertainty the fake model reports.
UNCERTAINTY = {"/data/a.png": 0.1, "/data/b.png": 0.6, "/data/c.png": 0.3}


class _Client:
    def __init__(self) -> None:
        self.projects = SimpleNamespace(
            get=lambda id: SimpleNamespace(label_config=captured("setup")["schema"])
        )
        tasks = [{"id": n, "data": {"image": url}, "annotations": []} for n, url in enumerate(UNCERTAINTY, 1)]
        tasks.append(
            {"id": 9, "data": {"image": "/data/done.png"}, "annotations": [{"was_cancelled": False}]}
        )
        self.tasks = SimpleNamespace(list=lambda **query: tasks)
        self.predictions = SimpleNamespace(create=lambda **p: self.created.append(p))
        self.views = SimpleNamespace(list=lambda project: [], create=lambda **v: self.views_created.append(v))
        self.created: list[dict] = []
        self.views_created: list[dict] = []


def test_rescore_asks_for_the_projects_classes_and_ascending_score_serves_the_most_uncertain_first(tmp_path):
    client, requests = _Client(), []

    def detect(request: dict) -> dict:
        requests.append(request)
        u = UNCERTAINTY[request["image"]["url"]]
        return {
            "width": 640,
            "height": 480,
            "objects": [],
            "model_version": "v2",
            "uncertainty": u,
            "confidence": 1 - u,
        }

    runtime = SimpleNamespace(
        access=SimpleNamespace(for_project=lambda project: SimpleNamespace(client=lambda: client)),
        settings=SimpleNamespace(model_store=str(tmp_path / "store"), model_dir=DEFAULT_CHECKPOINT),
        detect=detect,
        model_version="v2",
    )
    result = rescore(runtime, TrainRequest(project=1, trigger="test"))  # type: ignore[arg-type]
    assert result["rescored"] == 3
    # The measure is restricted to the model classes the project labels (the first output control's).
    assert all(r["uncertainty"] and r["classes"] == ["car", "dog", "person"] for r in requests)
    ascending = sorted(client.created, key=lambda p: p["score"])
    assert [p["task"] for p in ascending] == [2, 3, 1]
    assert client.views_created == [
        {"project": 1, "data": {"title": VIEW_TITLE, "ordering": ["tasks:predictions_score"]}}
    ]
