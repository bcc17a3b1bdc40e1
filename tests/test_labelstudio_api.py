"""Reading a project through label-studio-sdk: its config parsed, its tasks as dicts (a fake client)."""

from types import SimpleNamespace

from ls_bodies import captured

from backend.labelstudio_api import fetch_project, project_tasks


class _Task:
    def __init__(self, task_id: int) -> None:
        self.task_id = task_id

    def model_dump(self) -> dict:
        return {"id": self.task_id, "annotations": []}


class _Client:
    def __init__(self) -> None:
        self.listed: list[dict] = []
        self.projects = SimpleNamespace(get=self._project)
        self.tasks = SimpleNamespace(list=self._tasks)

    def _project(self, id: int) -> SimpleNamespace:
        return SimpleNamespace(label_config=captured("setup")["schema"])

    def _tasks(self, **query):
        self.listed.append(query)
        return [_Task(1), {"id": 2, "annotations": []}]


def test_tasks_come_as_dicts_with_all_their_fields():
    client = _Client()
    assert [t["id"] for t in project_tasks(client, 7)] == [1, 2]
    assert client.listed == [{"project": 7, "fields": "all", "page_size": 100}]


def test_a_project_is_its_tasks_and_parsed_config():
    client = _Client()
    access = SimpleNamespace(client=lambda: client)
    tasks, config = fetch_project(7, access)  # type: ignore[arg-type]
    assert [t["id"] for t in tasks] == [1, 2] and "image" in config.images
