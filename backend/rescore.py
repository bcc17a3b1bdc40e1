"""Active learning: after a new version, predict every unlabelled task and rank tasks by how informative
labelling them would be.

Each prediction's ``score`` is the model's *confidence* in its pre-annotation of that image: 1 minus the
uncertainty of :func:`segmodels.uncertainty.image_uncertainty` for the project's classes (the model classes
its first output control has a label for), in [0, 1]: the expected label error on the objects the project
labels, so images full of objects it does not label rank low. Sorting by *Prediction score* **ascending** in
Label Studio's Data Manager therefore serves the most uncertain (most useful) task first; a Data Manager tab
"segmask: most uncertain first" with that ordering is created once per project.
"""

from __future__ import annotations

import logging
import time

from backend.jobs import current_runtime
from backend.labelstudio import detections_prediction
from backend.labelstudio_api import project_config, project_tasks
from backend.model_lock import waiting_until, yielding
from backend.runtime import Runtime
from backend.training import TrainRequest
from backend.training_board import JobBoard, now
from backend.versions import open_store

log = logging.getLogger(__name__)
VIEW_TITLE = "segmask: most uncertain first"


def rescore_job(request: dict) -> dict:
    """RQ entry point (batch queue): rescore with this worker's warm model."""
    return rescore(current_runtime(), TrainRequest(**request))


def rescore(runtime: Runtime, req: TrainRequest) -> dict:
    """Write a ranked prediction for every task of ``req.project`` that has no annotation yet (Label Studio
    reached through ``runtime.access``)."""
    client = runtime.access.for_project(str(req.project)).client()
    config = project_config(client, req.project)
    to_name, output = next(iter(config.outputs.items()))
    board = JobBoard(open_store(runtime.settings))
    started, done = time.monotonic(), 0
    for task in project_tasks(client, req.project):
        if any(not a.get("was_cancelled") for a in task.get("annotations") or []):
            continue
        # Annotators' requests (embedded mode shares this runtime with them) go first, image by image.
        with waiting_until(yielding()):
            result = runtime.detect(
                {
                    "image": {"url": config.image_url(task, to_name), "project": str(req.project)},
                    "output": "brush" if output.type == "BrushLabels" else "polygon",
                    "classes": sorted(output.class_to_label),
                    "uncertainty": True,
                }
            )
        pred = detections_prediction(result, output)
        client.predictions.create(
            task=task["id"],
            result=pred["result"],
            score=result["confidence"],
            model_version=result["model_version"],
        )
        done += 1
    _ensure_view(client, req.project)
    record = board.write(
        req.project, rescored=done, rescored_at=now(), rescore_seconds=round(time.monotonic() - started, 1)
    )
    log.info("project %s: rescored %d unlabelled tasks with %s", req.project, done, runtime.model_version)
    return {"rescored": done, "model_version": runtime.model_version, "record": record}


def _ensure_view(client, project: int) -> None:
    """A Data Manager tab ordered by prediction score, ascending (most uncertain first)."""
    views = client.views.list(project=project)
    if any((v.data or {}).get("title") == VIEW_TITLE for v in views):
        return
    client.views.create(project=project, data={"title": VIEW_TITLE, "ordering": ["tasks:predictions_score"]})
