"""Reading a project from Label Studio's REST API (label-studio-sdk): its labelling config and its tasks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from backend.access import ProjectAccess
from backend.labelstudio import ProjectConfig, parse_config

PAGE_SIZE = 100


def project_config(client: Any, project_id: int) -> ProjectConfig:
    """The parsed labelling config of ``project_id`` (``client``: a label-studio-sdk client)."""
    return parse_config(client.projects.get(id=project_id).label_config)


def project_tasks(client: Any, project_id: int) -> Iterator[dict]:
    """Every task of ``project_id`` with all its fields (annotations included) as a dict, page by page."""
    for task in client.tasks.list(project=project_id, fields="all", page_size=PAGE_SIZE):
        yield task.model_dump() if hasattr(task, "model_dump") else dict(task)


def fetch_project(project_id: int, access: ProjectAccess) -> tuple[list[dict], ProjectConfig]:
    """The project's tasks with their annotations, and its label config (409 ``no_label_studio_access``
    when ``access`` knows no URL or credential)."""
    client = access.client()
    config = project_config(client, project_id)
    return list(project_tasks(client, project_id)), config
