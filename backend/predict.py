"""Label Studio's ``/predict``: validate the body, turn it into jobs, turn job results into predictions.

Interactive requests (``params.context`` holds the smart keypoints/rectangle) become one ``segment`` job on
the interactive queue; batch requests (no context) become one ``detect`` job per task on the batch queue.
Exactly one prediction per task comes back, in order; each carries the model version of the worker that
made it, which is the version ``/setup`` reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from backend.access import MAX_SETUP_FIELD_CHARS, LabelStudioAccess
from backend.dispatcher import Dispatcher
from backend.errors import ServiceError, bad_request
from backend.job_protocol import DETECT, SEGMENT, WARM, JobKind, JobOutcome
from backend.labelstudio import (
    OutputControl,
    ProjectConfig,
    detections_prediction,
    object_region,
    parse_config,
    prediction,
    prompt_from_context,
)
from backend.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class PredictService:
    """Answers ``/predict`` bodies; ``access`` keeps each project's ``/setup`` information for the jobs."""

    settings: Settings
    dispatcher: Dispatcher
    access: LabelStudioAccess

    def remember_setup(self, body: dict) -> None:
        """Keep what ``backend.access`` may use of a ``/setup`` body's ``hostname`` and ``access_token``."""
        hostname, token = body.get("hostname"), body.get("access_token")
        self.access.remember_setup(
            _project_id(body.get("project")), _setup_field(hostname), _setup_field(token)
        )

    def predict(self, body: object) -> tuple[JobKind, dict, list[JobOutcome]]:
        """``(kind of its jobs, response, finished jobs)`` for a ``/predict`` body: SEGMENT for an
        interactive request, DETECT for a batch (WARM when pre-annotation is off)."""
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object with 'tasks' and 'label_config'")
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            raise bad_request("'tasks' must be a non-empty list of task objects", "missing_tasks")
        config = parse_config(body.get("label_config"))
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise bad_request("'params' must be an object", "bad_params")
        image = self._image_ref(body)
        context = params.get("context")
        if context is None:
            return self._batch(tasks, config, image)
        return SEGMENT, *self._interactive(tasks[0], config, context, image)

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
        [outcome] = self.dispatcher.run(SEGMENT, [request], self.settings.interactive_timeout)
        result = outcome.result()
        size = (result["width"], result["height"])
        regions = [r for r in (object_region(output, prompt.label, o, size) for o in result["objects"]) if r]
        return {"results": [prediction(regions, result["model_version"])]}, [outcome]

    # ---- batch -------------------------------------------------------------------------------------------
    def _batch(
        self, tasks: list[dict], config: ProjectConfig, image: dict
    ) -> tuple[JobKind, dict, list[JobOutcome]]:
        if not config.outputs:
            raise bad_request(
                "the labelling config has no PolygonLabels or BrushLabels control on an Image",
                "unsupported_config",
            )
        to_name, output = next(iter(config.outputs.items()))
        if not self.settings.preannotate:
            requests = [{"image": {**image, "url": config.image_url(task, to_name)}} for task in tasks]
            return WARM, *self._collect(
                tasks, self.dispatcher.run(WARM, requests, self.settings.batch_timeout)
            )
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
        return DETECT, *self._collect(
            tasks, self.dispatcher.run(DETECT, requests, self.settings.batch_timeout), output
        )

    def _collect(
        self, tasks: list[dict], outcomes: list[JobOutcome], output: OutputControl | None = None
    ) -> tuple[dict, list[JobOutcome]]:
        """One prediction per task from its job's outcome: the detections on ``output``, or none (a warm
        job's). A failed task is logged and gets an empty prediction, unless every task failed."""
        results, failures, done = [], [], []
        for task, outcome in zip(tasks, outcomes, strict=True):
            try:
                result = outcome.result()
                results.append(
                    detections_prediction(result, output)
                    if output
                    else prediction([], result["model_version"])
                )
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
    def _image_ref(self, body: dict) -> dict:
        """The image part of a job: the project only, never a credential. The job applies
        ``backend.access``'s rule itself; this makes sure it finds the project's /setup information."""
        project = _project_id(body.get("project"))
        self.access.keep_alive(project)
        return {"project": project}


def _project_id(project: object) -> str:
    """Label Studio sends ``"<id>.<created_at timestamp>"``; the id part names the project."""
    return str(project).split(".", 1)[0] if project is not None else ""


def _setup_field(value: object) -> str | None:
    """A ``/setup`` hostname or token worth keeping: a non-empty string of at most MAX_SETUP_FIELD_CHARS."""
    return value if isinstance(value, str) and 0 < len(value) <= MAX_SETUP_FIELD_CHARS else None
