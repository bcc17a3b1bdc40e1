"""Retraining: annotations -> dataset snapshot -> fine-tune -> old vs new -> publish (or keep) -> rescore.

One training job per project at a time, and at most ``SEGMASK_MAX_TRAINING_JOBS`` queued or running in all
(a request over it is refused with a 429). A trigger while one is queued or running schedules exactly one
follow-up, which starts when the running job ends (so annotations made meanwhile are trained on too) and
takes over its slot.
With Redis the bookkeeping lives in Redis (several servers may receive webhooks) and the job runs on a
worker's ``training`` queue; in embedded mode it lives in this process and the job runs in a thread.

Every job writes its progress to ``<store>/jobs/<project>.json`` (stage, percent, result), shown by
``/jobs`` and in the logs; a failure is recorded there with its reason and the current version keeps
serving. The new version is built in the store's staging area and appears in one rename, so a killed job
leaves no half-written version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import redis
from rq import Queue, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.access import LabelStudioAccess, ProjectAccess, SetupRegistry
from backend.annotations import write_dataset
from backend.errors import ServiceError
from backend.images import ImageFetcher
from backend.labelstudio import parse_config
from backend.settings import Settings
from backend.versions import open_store
from segmodels.checkpoint import atomic_write_json
from segmodels.model_store import ModelStore

log = logging.getLogger(__name__)
# A training job that has not finished after this long is considered dead (its lock expires).
LOCK_SECONDS = 6 * 3600
# A lock whose job is not in RQ yet is being enqueued for at most this long.
ENQUEUE_GRACE_S = 30
ACTIVE_STATES = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
# The sorted set <prefix>:train:slots holds the projects with a job queued or running, scored by when their
# slot expires. TAKE_SLOT: KEYS slots; ARGV now, expiry, cap, project -> 1 if the project holds a slot now.
TAKE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[4]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  return 1
end
return 0
"""
# FREE_SLOT: KEYS slots, the project's lock; ARGV project. A lock taken again meanwhile keeps the slot.
FREE_SLOT = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
"""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---- progress records ------------------------------------------------------------------------------------
class JobBoard:
    """Per-project training records in ``<store>/jobs/<project>.json`` (atomic writes)."""

    def __init__(self, store: ModelStore) -> None:
        self.dir = store.root / "jobs" if store.root else None

    def write(self, project: int, **fields) -> dict:
        if self.dir is None:
            return fields
        path = self.dir / f"{project}.json"
        record = {**self.read(project), **fields, "project": project, "updated_at": now()}
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record)
        return record

    def read(self, project: int) -> dict:
        path = self.dir / f"{project}.json" if self.dir else None
        if path is None or not path.exists():
            return {}
        record = json.loads(path.read_text())
        if record.get("state") == "running" and not _process_alive(record):
            record = {**record, "state": "interrupted", "reason": "the job's process is gone (killed?)"}
        return record

    def all(self) -> list[dict]:
        if self.dir is None or not self.dir.exists():
            return []
        return [self.read(int(p.stem)) for p in sorted(self.dir.glob("*.json")) if p.stem.isdigit()]


def _process_alive(record: dict) -> bool:
    if record.get("host") != socket.gethostname():
        return True  # another machine's job: trust its record
    try:
        os.kill(int(record.get("pid", 0)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


# ---- scheduling ------------------------------------------------------------------------------------------
@dataclass
class TrainRequest:
    """What a training job needs: the project and what asked for it. No credential: the job reaches Label
    Studio by ``backend.access``'s rule (the worker's settings, the project's /setup in Redis)."""

    project: int
    trigger: str

    def to_json(self) -> dict:
        return self.__dict__.copy()


class TrainingScheduler:
    """Starts at most one training job per project and ``max_training_jobs`` in all; a trigger during a
    run schedules one follow-up."""

    def __init__(
        self,
        settings: Settings,
        connection: redis.Redis | None,
        rescore_inline: Callable[[TrainRequest], None] | None = None,
        access: LabelStudioAccess | None = None,
    ) -> None:
        """``connection`` None: embedded mode, jobs run in threads, reach Label Studio through ``access``
        (default: the settings alone) and ``rescore_inline`` rescores."""
        self.settings = settings
        self.connection = connection
        self.access = access
        self.prefix = f"{settings.queue_prefix}:train"
        self.rescore_inline = rescore_inline
        self._lock = threading.Lock()
        self._active: dict[int, threading.Thread] = {}
        self._again: dict[int, TrainRequest] = {}
        self._counts: dict[int, int] = {}

    def request(self, req: TrainRequest) -> str:
        """ "queued", "follow-up scheduled" (a job is running or queued), or a ServiceError if impossible."""
        if not self.settings.model_store:
            raise ServiceError(
                409, "no_model_store", "retraining needs a model store: set SEGMASK_MODEL_STORE"
            )
        if self.connection is None:
            return self._request_inline(req)
        return self._request_rq(req)

    def annotations_changed(
        self, project: int, count: int, make_request: Callable[[], TrainRequest]
    ) -> str | None:
        """Count annotation changes; every ``retrain_every`` of them request a training job."""
        every = self.settings.retrain_every
        if every <= 0 or count <= 0:
            return None
        if self.connection is None:
            with self._lock:
                total = self._counts[project] = self._counts.get(project, 0) + count
                if total >= every:
                    self._counts[project] = 0
        else:
            key = f"{self.prefix}:{project}:changes"
            with self.connection.pipeline() as pipe:
                pipe.incrby(key, count)
                pipe.expire(key, self.settings.retrain_count_ttl)
                total = int(pipe.execute()[0])
            if total >= every:
                self.connection.delete(key)
        if total >= every:
            return self.request(make_request())
        return None

    # RQ: Redis keys <prefix>:train:<project>:active (the job id) and :again (a follow-up request).
    def _request_rq(self, req: TrainRequest) -> str:
        active_key, again_key = f"{self.prefix}:{req.project}:active", f"{self.prefix}:{req.project}:again"
        job_id = f"train-{req.project}-{uuid.uuid4().hex[:12]}"
        lock = json.dumps({"job": job_id, "at": time.time()})
        for _ in range(3):
            if self.connection.set(active_key, lock, nx=True, ex=LOCK_SECONDS):
                if not self._take_slot(req.project):
                    self._release_if(active_key, lock.encode())
                    raise self._busy(req.project)
                self._enqueue(req, job_id)
                return "queued"
            held = self.connection.get(active_key)
            if held is not None and self._stale(json.loads(held), req.project):
                self._release_if(active_key, held)
                continue
            self.connection.set(again_key, json.dumps(req.to_json()), ex=LOCK_SECONDS)
            log.info("training of project %s already queued or running; one follow-up scheduled", req.project)
            return "follow-up scheduled"
        raise ServiceError(409, "training_conflict", f"could not schedule training of project {req.project}")

    def _busy(self, project: int) -> ServiceError:
        cap = self.settings.max_training_jobs
        return ServiceError(
            429,
            "training_busy",
            f"training of project {project} not started: {cap} training jobs are already queued or running "
            "(SEGMASK_MAX_TRAINING_JOBS); try again when one has ended",
        )

    def _take_slot(self, project: int) -> bool:
        """Count ``project`` among the jobs queued or running, if a slot is free (or it holds one already);
        slots of jobs that died are freed first when none is."""
        take = self.connection.register_script(TAKE_SLOT)
        args = [time.time(), time.time() + LOCK_SECONDS, self.settings.max_training_jobs, project]
        if take(keys=[f"{self.prefix}:slots"], args=args):
            return True
        self._free_dead_slots()
        return bool(take(keys=[f"{self.prefix}:slots"], args=args))

    def _free_dead_slots(self) -> None:
        """Free the slots of projects whose job has ended without saying so (a killed worker)."""
        for member in self.connection.zrange(f"{self.prefix}:slots", 0, -1):
            project = int(member)
            held = self.connection.get(f"{self.prefix}:{project}:active")
            if held is None or self._stale(json.loads(held), project):
                self.connection.zrem(f"{self.prefix}:slots", member)

    def _enqueue(self, req: TrainRequest, job_id: str) -> None:
        queue = Queue(
            f"{self.settings.queue_prefix}:training", connection=self.connection, serializer=JSONSerializer
        )
        queue.enqueue(
            "backend.training.train_job",
            req.to_json(),
            job_id=job_id,
            job_timeout=LOCK_SECONDS,
            result_ttl=24 * 3600,
            failure_ttl=7 * 24 * 3600,
        )
        JobBoard(open_store(self.settings)).write(
            req.project, state="queued", trigger=req.trigger, job_id=job_id, queued_at=now()
        )
        log.info("training of project %s queued (%s)", req.project, req.trigger)

    def _release_if(self, key: str, value: bytes) -> None:
        """Delete ``key`` only if it still holds ``value`` (another process may have taken it meanwhile)."""
        with self.connection.pipeline() as pipe:
            try:
                pipe.watch(key)
                if pipe.get(key) == value:
                    pipe.multi()
                    pipe.delete(key)
                    pipe.execute()
            except redis.WatchError:
                pass

    def _stale(self, lock: dict, project: int) -> bool:
        """True when the job holding the project's lock has ended, or its process is gone (a killed worker
        leaves its job "started" in RQ until RQ's own cleanup, minutes later). A lock taken moments ago
        whose job is not in RQ yet is being enqueued, not stale."""
        try:
            job = Job.fetch(lock["job"], connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            return time.time() - lock["at"] > ENQUEUE_GRACE_S
        if job.get_status() not in ACTIVE_STATES:
            return True
        return JobBoard(open_store(self.settings)).read(project).get("state") == "interrupted"

    def finished_rq(self, project: int) -> None:
        """Called by the job at its end: release the lock, start the follow-up if one was asked for (it
        keeps the project's slot), else free the slot."""
        active_key = f"{self.prefix}:{project}:active"
        self.connection.delete(active_key)
        again = self.connection.getdel(f"{self.prefix}:{project}:again")
        if again:
            self.request(TrainRequest(**{**json.loads(again), "trigger": "follow-up"}))
        else:
            self.connection.register_script(FREE_SLOT)(
                keys=[f"{self.prefix}:slots", active_key], args=[project]
            )

    # Embedded: a thread per job, at most max_training_jobs of them; the same rules in memory.
    def _request_inline(self, req: TrainRequest) -> str:
        with self._lock:
            if req.project in self._active:
                self._again[req.project] = req
                return "follow-up scheduled"
            if len(self._active) >= self.settings.max_training_jobs:
                raise self._busy(req.project)
            self._start_inline(req)
            return "queued"

    def _start_inline(self, req: TrainRequest) -> None:
        """Start ``req``'s thread (with ``self._lock`` held); it stays in ``_active`` until it ends."""
        thread = threading.Thread(
            target=self._run_inline, args=(req,), name=f"train-{req.project}", daemon=True
        )
        self._active[req.project] = thread
        JobBoard(open_store(self.settings)).write(
            req.project, state="queued", trigger=req.trigger, queued_at=now()
        )
        thread.start()

    def _run_inline(self, req: TrainRequest) -> None:
        try:
            access = self.access or LabelStudioAccess(self.settings, SetupRegistry())
            run_training(self.settings, req, access, self.rescore_inline)
        finally:
            with self._lock:
                again = self._again.pop(req.project, None)
                if again is None:
                    self._active.pop(req.project, None)
                else:  # the follow-up takes over this job's slot
                    self._start_inline(TrainRequest(**{**again.to_json(), "trigger": "follow-up"}))


# ---- the job ---------------------------------------------------------------------------------------------
def train_job(request: dict) -> dict:
    """RQ entry point on the training queue."""
    settings = Settings.from_env()
    req = TrainRequest(**request)
    connection = get_current_job().connection
    access = LabelStudioAccess(settings, SetupRegistry(connection, settings.queue_prefix))
    try:
        return run_training(settings, req, access, rescore=_enqueue_rescore(settings, connection))
    finally:
        TrainingScheduler(settings, connection).finished_rq(req.project)


def _enqueue_rescore(settings: Settings, connection: redis.Redis) -> Callable[[TrainRequest], None]:
    def enqueue(req: TrainRequest) -> None:
        queue = Queue(f"{settings.queue_prefix}:batch", connection=connection, serializer=JSONSerializer)
        queue.enqueue("backend.rescore.rescore_job", req.to_json(), job_timeout=3600, result_ttl=24 * 3600)

    return enqueue


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


def fetch_project(project_id: int, access: ProjectAccess) -> tuple[list[dict], object]:
    """The project's label config and every task with its annotations, through label-studio-sdk (409
    ``no_label_studio_access`` when ``access`` knows no URL or credential)."""
    client = access.client()
    project = client.projects.get(id=project_id)
    tasks = [
        task.model_dump() if hasattr(task, "model_dump") else dict(task)
        for task in client.tasks.list(project=project_id, fields="all", page_size=100)
    ]
    return tasks, parse_config(project.label_config)
