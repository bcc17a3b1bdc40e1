"""A training job: annotations -> dataset snapshot -> fine-tune -> old vs new -> publish (or keep) -> rescore.

The job reads the project through Label Studio's API (backend.labelstudio_api), writes its progress to the
project's record on the job board (backend.training_board: stage, percent, result, shown by ``/jobs`` and in
the logs) and keeps its log lines in the new version's ``train.log``. A failure is recorded with its reason
and the current version keeps serving. The new version is built in the store's staging area and appears in
one rename, so a killed job leaves no half-written version. When and where jobs run is
backend.training_scheduler's business.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rq import get_current_job

from backend.access import LabelStudioAccess
from backend.annotations import write_dataset
from backend.errors import ServiceError
from backend.images import ImageFetcher
from backend.labelstudio_api import fetch_project
from backend.settings import Settings
from backend.training_board import JobBoard, now
from backend.versions import open_store
from segmodels.checkpoint_files import atomic_write_json
from segmodels.model_store import ModelStore

log = logging.getLogger(__name__)


@dataclass
class TrainRequest:
    """What a training job needs: the project and what asked for it. No credential: the job reaches Label
    Studio by ``backend.access``'s rule (the worker's settings, the project's /setup in Redis)."""

    project: int
    trigger: str

    def to_json(self) -> dict:
        return self.__dict__.copy()


def run_training(
    settings: Settings,
    req: TrainRequest,
    access: LabelStudioAccess,
    rescore: Callable[[TrainRequest], None] | None,
) -> dict:
    """The whole job, reaching Label Studio through ``access``; returns (and records) its outcome. Any
    failure leaves the current version serving."""
    from segmodels.finetune import FinetuneConfig, compare, finetune

    store = open_store(settings)
    board = JobBoard(store)
    started = time.monotonic()
    board.write(
        req.project,
        state="running",
        stage="reading annotations",
        percent=0,
        started_at=now(),
        finished_at=None,
        error=None,
        reason=None,
        host=socket.gethostname(),
        pid=os.getpid(),
        trigger=req.trigger,
        base_version=store.current_version(),
    )

    def progress(stage: str, fraction: float) -> None:
        percent = round(10 + 80 * fraction, 1)
        board.write(req.project, stage=stage, percent=percent)
        job = get_current_job()
        if job is not None:
            job.meta.update(stage=stage, percent=percent)
            job.save_meta()

    try:
        label_studio = access.for_project(str(req.project))
        tasks, config = fetch_project(req.project, label_studio)
        with store.new_version() as staged, _job_log(staged.path / "train.log"):
            fetcher = ImageFetcher(settings)
            summary = write_dataset(
                tasks,
                config,
                lambda url: fetcher.fetch(url, label_studio.url, label_studio.authorization()),
                staged.path / "data",
            )
            if not summary.train_image_ids:
                raise ServiceError(
                    409, "nothing_to_train", f"project {req.project} has no annotated images to train on"
                )
            log.info(
                "project %s: %d images, %d instances %s",
                req.project,
                summary.images,
                summary.instances,
                summary.per_label,
            )
            board.write(req.project, stage="fine-tuning", percent=10, data=summary.to_json())
            base = store.current_dir()
            finetune(
                base,
                staged.path / "data",
                staged.path,
                FinetuneConfig(device=settings.device),
                train_image_ids=summary.train_image_ids,
                progress=progress,
            )
            board.write(req.project, stage="evaluating old vs new", percent=90)
            metrics = compare(base, staged.path, staged.path / "data", summary.heldout_image_ids)
            # The candidate has no number until its staging directory joins the store.
            metrics.setdefault("new", {})["version"] = "candidate"
            atomic_write_json(staged.path / "metrics.json", {**metrics, "data": summary.to_json()})
        return _decide(store, board, req, staged.name, metrics, started, rescore)
    except Exception as exc:
        reason = exc.message if isinstance(exc, ServiceError) else f"{exc.__class__.__name__}: {exc}"
        log.error("training of project %s failed: %s\n%s", req.project, reason, traceback.format_exc())
        board.write(
            req.project,
            state="failed",
            stage=None,
            finished_at=now(),
            error=reason,
            seconds=round(time.monotonic() - started, 1),
        )
        return {"state": "failed", "error": reason}


@contextlib.contextmanager
def _job_log(path: Path) -> Iterator[None]:
    """Keep this job's log lines (data, fine-tuning, comparison) in the version's ``train.log``."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _decide(
    store: ModelStore,
    board: JobBoard,
    req: TrainRequest,
    name: str,
    metrics: dict,
    started: float,
    rescore: Callable[[TrainRequest], None] | None,
) -> dict:
    seconds = round(time.monotonic() - started, 1)
    published = bool(metrics.get("better_or_equal", False))
    reason = None if published else metrics.get("reason", "the new version is worse on the held-out slice")
    if published:
        store.publish(name, f"trained on project {req.project} ({req.trigger})")
        log.info("project %s: published %s in %.0f s", req.project, name, seconds)
    else:
        log.warning(
            "project %s: kept %s; %s not published: %s", req.project, store.current_version(), name, reason
        )
    record = board.write(
        req.project,
        state="published" if published else "kept",
        stage=None,
        percent=100,
        version=name,
        finished_at=now(),
        seconds=seconds,
        metrics=metrics,
        reason=reason,
    )
    if published and rescore is not None:
        rescore(req)
    return record
