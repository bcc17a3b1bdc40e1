"""When and where training jobs (backend.training) run.

One training job per project at a time, and at most ``SEGMASK_MAX_TRAINING_JOBS`` queued or running in all
(a request over it is refused with a 429). A trigger while one is queued or running schedules exactly one
follow-up, which starts when the running job ends (so annotations made meanwhile are trained on too) and
takes over its slot. With Redis the bookkeeping lives in Redis (several servers may receive webhooks) and
the job runs on a worker's ``training`` queue (:class:`RQTrainingSchedule`, :func:`train_job`); in embedded
mode it lives in this process and the job runs in a thread (:class:`ThreadTrainingSchedule`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis
from rq import Queue, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.access import LabelStudioAccess, SetupRegistry
from backend.errors import ServiceError
from backend.settings import Settings
from backend.training import TrainRequest, run_training
from backend.training_board import JobBoard, now
from backend.versions import open_store

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
        self.schedule: RQTrainingSchedule | ThreadTrainingSchedule = (
            ThreadTrainingSchedule(settings, rescore_inline, access)
            if connection is None
            else RQTrainingSchedule(settings, connection)
        )

    def request(self, req: TrainRequest) -> str:
        """ "queued", "follow-up scheduled" (a job is running or queued), or a ServiceError if impossible."""
        return self.schedule.request(req)

    def annotations_changed(
        self, project: int, count: int, make_request: Callable[[], TrainRequest]
    ) -> str | None:
        """Count annotation changes; every ``retrain_every`` of them request a training job."""
        every = self.settings.retrain_every
        if every <= 0 or count <= 0:
            return None
        if self.schedule.count_changes(project, count, every):
            return self.request(make_request())
        return None

    def finished_rq(self, project: int) -> None:
        """Called by an RQ job at its end (see :meth:`RQTrainingSchedule.finished`)."""
        self.schedule.finished(project)


def _require_store(settings: Settings) -> None:
    if not settings.model_store:
        raise ServiceError(409, "no_model_store", "retraining needs a model store: set SEGMASK_MODEL_STORE")


def _busy(settings: Settings, project: int) -> ServiceError:
    cap = settings.max_training_jobs
    return ServiceError(
        429,
        "training_busy",
        f"training of project {project} not started: {cap} training jobs are already queued or running "
        "(SEGMASK_MAX_TRAINING_JOBS); try again when one has ended",
    )


def _follow_up(req: TrainRequest) -> TrainRequest:
    return TrainRequest(**{**req.to_json(), "trigger": "follow-up"})


class RQTrainingSchedule:
    """The rules in Redis, jobs on RQ's ``<prefix>:training`` queue. Keys under ``<prefix>:train``:
    ``<project>:active`` (the lock: the job id), ``<project>:again`` (a follow-up request),
    ``<project>:changes`` (the annotation change count) and ``slots`` (see :data:`TAKE_SLOT`)."""

    def __init__(self, settings: Settings, connection: redis.Redis) -> None:
        self.settings = settings
        self.connection = connection
        self.prefix = f"{settings.queue_prefix}:train"

    def request(self, req: TrainRequest) -> str:
        """See :meth:`TrainingScheduler.request`."""
        _require_store(self.settings)
        active_key, again_key = f"{self.prefix}:{req.project}:active", f"{self.prefix}:{req.project}:again"
        job_id = f"train-{req.project}-{uuid.uuid4().hex[:12]}"
        lock = json.dumps({"job": job_id, "at": time.time()})
        for _ in range(3):
            if self.connection.set(active_key, lock, nx=True, ex=LOCK_SECONDS):
                if not self._take_slot(req.project):
                    self._release_if(active_key, lock.encode())
                    raise _busy(self.settings, req.project)
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

    def count_changes(self, project: int, count: int, every: int) -> bool:
        """Add ``count`` changes to ``project``'s count (kept ``retrain_count_ttl`` s); True, and the count
        reset, when it reaches ``every``."""
        key = f"{self.prefix}:{project}:changes"
        with self.connection.pipeline() as pipe:
            pipe.incrby(key, count)
            pipe.expire(key, self.settings.retrain_count_ttl)
            total = int(pipe.execute()[0])
        if total >= every:
            self.connection.delete(key)
        return total >= every

    def finished(self, project: int) -> None:
        """Release the project's lock, start the follow-up if one was asked for (it keeps the project's
        slot), else free the slot."""
        active_key = f"{self.prefix}:{project}:active"
        self.connection.delete(active_key)
        again = self.connection.getdel(f"{self.prefix}:{project}:again")
        if again:
            self.request(_follow_up(TrainRequest(**json.loads(again))))
        else:
            self.connection.register_script(FREE_SLOT)(
                keys=[f"{self.prefix}:slots", active_key], args=[project]
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
            train_job,
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


class ThreadTrainingSchedule:
    """The same rules in this process's memory, a thread per job (at most ``max_training_jobs``)."""

    def __init__(
        self,
        settings: Settings,
        rescore: Callable[[TrainRequest], None] | None,
        access: LabelStudioAccess | None,
    ) -> None:
        self.settings = settings
        self.rescore = rescore
        self.access = access
        self._lock = threading.Lock()
        self._active: dict[int, threading.Thread] = {}
        self._again: dict[int, TrainRequest] = {}
        self._counts: dict[int, int] = {}

    def request(self, req: TrainRequest) -> str:
        """See :meth:`TrainingScheduler.request`."""
        _require_store(self.settings)
        with self._lock:
            if req.project in self._active:
                self._again[req.project] = req
                return "follow-up scheduled"
            if len(self._active) >= self.settings.max_training_jobs:
                raise _busy(self.settings, req.project)
            self._start(req)
            return "queued"

    def count_changes(self, project: int, count: int, every: int) -> bool:
        """Add ``count`` changes to ``project``'s count; True, and the count reset, when it reaches
        ``every``."""
        with self._lock:
            total = self._counts[project] = self._counts.get(project, 0) + count
            if total >= every:
                self._counts[project] = 0
        return total >= every

    def _start(self, req: TrainRequest) -> None:
        """Start ``req``'s thread (with ``self._lock`` held); it stays in ``_active`` until it ends."""
        thread = threading.Thread(target=self._run, args=(req,), name=f"train-{req.project}", daemon=True)
        self._active[req.project] = thread
        JobBoard(open_store(self.settings)).write(
            req.project, state="queued", trigger=req.trigger, queued_at=now()
        )
        thread.start()

    def _run(self, req: TrainRequest) -> None:
        try:
            access = self.access or LabelStudioAccess(self.settings, SetupRegistry())
            run_training(self.settings, req, access, self.rescore)
        finally:
            with self._lock:
                again = self._again.pop(req.project, None)
                if again is None:
                    self._active.pop(req.project, None)
                else:  # the follow-up takes over this job's slot
                    self._start(_follow_up(again))


def train_job(request: dict) -> dict:
    """RQ entry point on the training queue: run the job, then hand the project's slot on."""
    settings = Settings.from_env()
    req = TrainRequest(**request)
    connection = get_current_job().connection
    access = LabelStudioAccess(settings, SetupRegistry(connection, settings.queue_prefix))
    try:
        return run_training(settings, req, access, rescore=_enqueue_rescore(settings, connection))
    finally:
        RQTrainingSchedule(settings, connection).finished(req.project)


def _enqueue_rescore(settings: Settings, connection: redis.Redis) -> Callable[[TrainRequest], None]:
    def enqueue(req: TrainRequest) -> None:
        queue = Queue(f"{settings.queue_prefix}:batch", connection=connection, serializer=JSONSerializer)
        queue.enqueue("backend.rescore.rescore_job", req.to_json(), job_timeout=3600, result_ttl=24 * 3600)

    return enqueue
