"""Label Studio's ``/predict``: validate the body, turn it into jobs, turn job results into predictions.

Interactive requests (``params.context`` holds the smart keypoints/rectangle) become one ``segment`` job on
the interactive queue; batch requests (no context) become one ``detect`` job per task on the batch queue.
Exactly one prediction per task comes back, in order; each carries the model version of the worker that
made it, which is the version ``/setup`` reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis

from backend.credentials import LabelStudioCredentials
from backend.errors import ServiceError, bad_request
from backend.labelstudio import (
    ProjectConfig,
    detections_prediction,
    object_region,
    parse_config,
    prediction,
    prompt_from_context,
)
from backend.queue import Dispatcher, JobOutcome, unwrap
from backend.settings import Settings

log = logging.getLogger(__name__)
SETUP_TTL_S = 7 * 24 * 3600


@dataclass
class SetupInfo:
    """What Label Studio told us in ``/setup`` for one project: its URL and (legacy) access token."""

    hostname: str | None = None
    access_token: str | None = None


class SetupRegistry:
    """``/setup`` information by project id. With Redis it is kept there (for a week), so every server
    process, and every server machine, knows what Label Studio told any one of them."""

    def __init__(self, connection: redis.Redis | None = None, prefix: str = "segmask") -> None:
        self.connection = connection
        self.prefix = f"{prefix}:setup"
        self._local: dict[str, SetupInfo] = {}

    def remember(self, project: str, info: SetupInfo) -> None:
        self._local[project] = info
        if self.connection is None:
            return
        fields = {k: v for k, v in (("hostname", info.hostname), ("access_token", info.access_token)) if v}
        key = f"{self.prefix}:{project}"
        with self.connection.pipeline() as pipe:
            pipe.delete(key)
            if fields:
                pipe.hset(key, mapping=fields)
                pipe.expire(key, SETUP_TTL_S)
            pipe.execute()

    def get(self, project: str) -> SetupInfo | None:
        if self.connection is None:
            return self._local.get(project)
        fields = {
            k.decode(): v.decode() for k, v in self.connection.hgetall(f"{self.prefix}:{project}").items()
        }
        # This process's own copy covers a Redis that restarted empty, until Label Studio sends /setup again.
        return (
            SetupInfo(fields.get("hostname"), fields.get("access_token"))
            if fields
            else self._local.get(project)
        )


@dataclass
class PredictService:
    """Answers ``/predict`` bodies; remembers each project's ``/setup`` information for image access."""

    settings: Settings
    dispatcher: Dispatcher
    credentials: LabelStudioCredentials
    setups: SetupRegistry = field(default_factory=SetupRegistry)

    def remember_setup(self, body: dict) -> None:
        """Keep ``hostname`` and ``access_token`` of a ``/setup`` body, keyed by project id."""
        project = _project_id(body.get("project"))
        hostname, token = body.get("hostname"), body.get("access_token")
        self.setups.remember(
            project,
            SetupInfo(
                hostname if isinstance(hostname, str) and hostname else None,
                token if isinstance(token, str) and token else None,
            ),
        )

    def predict(self, body: object) -> tuple[str, dict, list[JobOutcome]]:
        """``(mode, response, finished jobs)`` for a ``/predict`` body; mode is "interactive" or "batch"."""
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object with 'tasks' and 'label_config'")
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            raise bad_request("'tasks' must be a non-empty list of task objects", "missing_tasks")
        config = parse_config(body.get("label_config"))
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise bad_request("'params' must be an object", "bad_params")
        image = self._image_access(body)
        context = params.get("context")
        if context is None:
            return "batch", *self._batch(tasks, config, image)
        return "interactive", *self._interactive(tasks[0], config, context, image)

    # ---- interactive -------------------------------------------------------------------------------------
    def _interactive(
        self, task: dict, config: ProjectConfig, context: object, image: dict
    ) -> tuple[dict, list]:
        if isinstance(context, dict) and context.get("result") == []:
            return {"results": []}, []
        prompt = prompt_from_context(context, config)
        output = config.output_for(prompt.to_name)
        request = {
            "image": {**image, "url": config.image_url(task, prompt.to_name)},
            "prompt": prompt.to_json(),
            "output": "brush" if output.type == "BrushLabels" else "polygon",
        }
        [outcome] = self.dispatcher.run("segment", [request], self.settings.interactive_timeout)
        if isinstance(outcome, ServiceError):
            raise outcome
        result = unwrap(outcome)
        size = (result["width"], result["height"])
        regions = [r for r in (object_region(output, prompt.label, o, size) for o in result["objects"]) if r]
        return {"results": [prediction(regions, result["model_version"])]}, [outcome]

    # ---- batch -------------------------------------------------------------------------------------------
    def _batch(self, tasks: list[dict], config: ProjectConfig, image: dict) -> tuple[dict, list]:
        if not config.outputs:
            raise bad_request(
                "the labelling config has no PolygonLabels or BrushLabels control on an Image",
                "unsupported_config",
            )
        to_name, output = next(iter(config.outputs.items()))
        requests = [
            {
                "image": {**image, "url": config.image_url(task, to_name)},
                "output": "brush" if output.type == "BrushLabels" else "polygon",
                "score_threshold": self.settings.score_threshold,
                "max_detections": self.settings.max_detections,
                "classes": sorted(output.class_to_label),
            }
            for task in tasks
        ]
        outcomes = self.dispatcher.run("detect", requests, self.settings.batch_timeout)
        results, failures, done = [], [], []
        for task, outcome in zip(tasks, outcomes, strict=True):
            try:
                if isinstance(outcome, ServiceError):
                    raise outcome
                results.append(detections_prediction(unwrap(outcome), output))
                done.append(outcome)
            except ServiceError as exc:
                log.error("pre-annotation of task %s failed: %s (%s)", task.get("id"), exc.message, exc.kind)
                failures.append((task.get("id"), exc))
                results.append(None)
        if len(failures) == len(tasks):
            first_id, first = failures[0]
            raise ServiceError(first.status, first.kind, f"task {first_id}: {first.message}")
        # Label Studio needs one entry per task, in order: a failed task gets an empty prediction (stored as
        # nothing by Label Studio), and the failure is in the log and /metrics.
        version = next(r["model_version"] for r in results if r)
        return {"results": [r or prediction([], version) for r in results]}, done

    # ---- image access ------------------------------------------------------------------------------------
    def _image_access(self, body: dict) -> dict:
        """Where uploads live and how to authenticate: settings first, then the project's /setup values."""
        setup = self.setups.get(_project_id(body.get("project"))) or SetupInfo()
        base = self.settings.label_studio_url or setup.hostname
        return {
            "label_studio_url": base,
            "authorization": self.credentials.authorization(setup.access_token) if base else None,
        }


def _project_id(project: object) -> str:
    """Label Studio sends ``"<id>.<created_at timestamp>"``; the id part names the project."""
    return str(project).split(".", 1)[0] if project is not None else ""
