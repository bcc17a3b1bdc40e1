"""Label Studio webhook events -> training triggers (answered at once; the work happens in a job).

Payloads are hints: they say *that* a project changed, never what to train on (the job re-reads the
project through the API). ``START_TRAINING`` (the Train button) requests training now; annotation and
task changes are counted and every ``SEGMASK_RETRAIN_EVERY`` of them request training.

Events only act for projects this backend was set up for (a ``/setup`` from Label Studio): anyone who can
reach an unauthenticated ``/webhook`` could otherwise create counters and training jobs for any project id.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict

import redis

from backend.errors import ServiceError, bad_request
from backend.predict import PredictService
from backend.training import TrainRequest
from backend.training_scheduler import TrainingScheduler

log = logging.getLogger(__name__)
# The actions Label Studio sends (webhooks, and START_TRAINING from the Train button); any other is counted in
# /metrics as "other", so arbitrary strings cannot create metric series.
LABEL_STUDIO_ACTIONS = frozenset(
    {
        "PROJECT_CREATED",
        "PROJECT_UPDATED",
        "PROJECT_DELETED",
        "TASKS_CREATED",
        "TASKS_DELETED",
        "ANNOTATION_CREATED",
        "ANNOTATIONS_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATIONS_DELETED",
        "LABEL_LINK_CREATED",
        "LABEL_LINK_UPDATED",
        "LABEL_LINK_DELETED",
        "REVIEW_CREATED",
        "REVIEW_UPDATED",
        "REVIEWS_DELETED",
        "START_TRAINING",
    }
)
# A project stays known this long after its last /setup (Label Studio sends /setup each time it lists a
# project's models, e.g. when its model settings are opened).
KNOWN_TTL_S = 7 * 24 * 3600
# Embedded mode remembers at most this many projects (the most recently set up).
MAX_KNOWN_LOCAL = 10_000
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


def action_label(action: str) -> str:
    """The ``action`` label of ``segmask_webhook_events_total``: a Label Studio action, else "other"."""
    return action if action in LABEL_STUDIO_ACTIONS else "other"


def setup_project_id(body: dict) -> int | None:
    """The project of a ``/setup`` body (Label Studio sends ``"<id>.<created_at timestamp>"``)."""
    head = str(body.get("project", "")).split(".", 1)[0]
    return int(head) if re.fullmatch("[0-9]{1,18}", head) else None


class KnownProjects:
    """Projects that sent ``/setup``. With Redis: keys ``<prefix>:known:<id>`` that expire
    ``KNOWN_TTL_S`` after the last ``/setup``, so every server process knows them; in embedded mode: the
    ``MAX_KNOWN_LOCAL`` most recently set up, in memory."""

    def __init__(self, connection: redis.Redis | None, prefix: str) -> None:
        self.connection = connection
        self.prefix = f"{prefix}:known"
        self._local: OrderedDict[int, None] = OrderedDict()

    def add(self, project: int) -> None:
        """Remember (or refresh) ``project``."""
        if self.connection is not None:
            self.connection.set(f"{self.prefix}:{project}", 1, ex=KNOWN_TTL_S)
            return
        self._local[project] = None
        self._local.move_to_end(project)
        if len(self._local) > MAX_KNOWN_LOCAL:
            self._local.popitem(last=False)

    def __contains__(self, project: int) -> bool:
        """Whether ``project`` sent ``/setup`` (within ``KNOWN_TTL_S`` with Redis)."""
        if self.connection is not None:
            return bool(self.connection.exists(f"{self.prefix}:{project}"))
        return project in self._local


def project_id(body: dict) -> int | None:
    """The project of a webhook payload (``project`` is an object with ``id``, or an id)."""
    project = body.get("project")
    value = project.get("id") if isinstance(project, dict) else project
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class WebhookHandler:
    """Turns events into training requests for ``scheduler``; ``service`` knows each project's /setup, and
    ``known`` which projects sent one."""

    def __init__(self, scheduler: TrainingScheduler, service: PredictService, known: KnownProjects) -> None:
        self.scheduler = scheduler
        self.service = service
        self.known = known

    def train_request(self, project: int, trigger: str) -> TrainRequest:
        """A training request; 409 when the job could not reach Label Studio (the rule of backend.access)."""
        self.service.access.require_api(str(project))
        return TrainRequest(project, trigger)

    def handle(self, body: dict) -> dict:
        """``{"action", "project", "training"?}``; START_TRAINING answers what happened to the request."""
        action, project = body["action"], project_id(body)
        answer = {"status": "ok", "action": action, "project": project}
        if action == "START_TRAINING":
            if project is None:
                raise bad_request("START_TRAINING without a project id", "bad_webhook")
            self._require_known(project)
            answer["training"] = self.scheduler.request(self.train_request(project, "START_TRAINING"))
        elif action in COUNTED and project is not None and project in self.known:
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

    def _require_known(self, project: int) -> None:
        """A 409 unless Label Studio sent ``/setup`` for ``project`` (connecting the model does)."""
        if project not in self.known:
            raise ServiceError(
                409,
                "unknown_project",
                f"project {project} has not been set up with this backend (no /setup from Label Studio for "
                "it); connect the model in the project's settings, or use the admin route POST /train",
            )
