"""Label Studio webhook events -> training triggers (answered at once; the work happens in a job).

Payloads are hints: they say *that* a project changed, never what to train on (the job re-reads the
project through the API). ``START_TRAINING`` (the Train button) requests training now; annotation and
task changes are counted and every ``SEGMASK_RETRAIN_EVERY`` of them request training.
"""

from __future__ import annotations

import logging

from backend.errors import ServiceError, bad_request
from backend.predict import PredictService
from backend.training import TrainingScheduler, TrainRequest

log = logging.getLogger(__name__)
# Events that change what a project would train on, and how many changes each payload carries.
COUNTED = {
    "ANNOTATION_CREATED": lambda body: 1,
    "ANNOTATION_UPDATED": lambda body: 1,
    "ANNOTATIONS_CREATED": lambda body: _length(body, "annotation", "annotations"),
    "ANNOTATIONS_DELETED": lambda body: _length(body, "annotations", "annotation"),
    "TASKS_DELETED": lambda body: _length(body, "tasks"),
}


def _length(body: dict, *keys: str) -> int:
    for key in keys:
        value = body.get(key)
        if isinstance(value, list):
            return len(value)
    return 1


def project_id(body: dict) -> int | None:
    """The project of a webhook payload (``project`` is an object with ``id``, or an id)."""
    project = body.get("project")
    value = project.get("id") if isinstance(project, dict) else project
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class WebhookHandler:
    """Turns events into training requests for ``scheduler``; ``service`` knows each project's /setup."""

    def __init__(self, scheduler: TrainingScheduler, service: PredictService) -> None:
        self.scheduler = scheduler
        self.service = service

    def train_request(self, project: int, trigger: str) -> TrainRequest:
        """How the job will reach Label Studio: settings first, then what /setup told us."""
        settings, setup = self.service.settings, self.service.setups.get(str(project))
        url = settings.label_studio_url or (setup.hostname if setup else None)
        key = settings.label_studio_api_key or (setup.access_token if setup else None)
        if not url or not key:
            raise ServiceError(
                409,
                "no_label_studio_access",
                f"cannot train project {project}: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or let "
                "Label Studio send /setup with a legacy token first)",
            )
        return TrainRequest(project, url, key, trigger)

    def handle(self, body: dict) -> dict:
        """``{"action", "project", "training"?}``; START_TRAINING answers what happened to the request."""
        action, project = body["action"], project_id(body)
        answer = {"status": "ok", "action": action, "project": project}
        if action == "START_TRAINING":
            if project is None:
                raise bad_request("START_TRAINING without a project id", "bad_webhook")
            answer["training"] = self.scheduler.request(self.train_request(project, "START_TRAINING"))
        elif action in COUNTED and project is not None:
            try:
                state = self.scheduler.annotations_changed(
                    project, COUNTED[action](body), lambda: self.train_request(project, f"{action} (every N)")
                )
            except ServiceError as exc:
                log.warning("automatic training of project %s not started: %s", project, exc.message)
                state = None
            if state:
                answer["training"] = state
        return answer
