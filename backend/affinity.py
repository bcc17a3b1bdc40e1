"""Cache affinity: a click goes to the worker that already holds its image's features.

A worker keeps the features of the images it worked on (backend.feature_cache); with several workers, a
click that lands on another one pays for the trunk again. So each worker also serves, beside the shared
queues, a click lane of its own (backend.click_lane), and when it starts a job on an image it records
``<prefix>:affinity:<image key>`` -> its name, for ``SEGMASK_AFFINITY_TTL`` seconds after its last job on
that image. The server sends a click on that image to the recorded worker's lane when that lane is served
(a worker without the interactive queue, or a ``--burst`` one, has none), has no click waiting and the worker
is not running a batch or training job; otherwise, to the shared interactive queue, where any worker takes
it. Pre-annotation (and Label Studio opening a task) therefore
leaves the features where the clicks on that task will find them.

The image key is a hash of the project and the image URL: what the server knows before anything is
downloaded. The feature cache itself is keyed by the image's content, so a stale record costs at most one
cache miss, never a wrong mask.
"""

from __future__ import annotations

import hashlib

import redis

from backend.click_lane import alive_key, lane_key


def image_key(image_ref: dict) -> str:
    """The affinity key of a job's ``image`` (``{"project", "url"}``)."""
    identity = f"{image_ref.get('project') or ''}\n{image_ref.get('url') or ''}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


class AffinityMap:
    """Which worker last worked on which image, in Redis (shared by the server and every worker)."""

    def __init__(self, connection: redis.Redis, prefix: str, ttl: int) -> None:
        self.connection, self.prefix, self.ttl = connection, prefix, ttl

    def _key(self, image_ref: dict) -> str:
        return f"{self.prefix}:affinity:{image_key(image_ref)}"

    def remember(self, image_ref: dict, worker_name: str) -> None:
        """Record that ``worker_name`` is working on ``image_ref``'s image now (worker side)."""
        self.connection.set(self._key(image_ref), worker_name, ex=self.ttl)

    def worker_for(self, image_ref: dict) -> str | None:
        """The name of the worker holding ``image_ref``'s features when a click can be served there without
        waiting behind other work (server side), else None: use the shared queue."""
        name = self.connection.get(self._key(image_ref))
        if name is None:
            return None
        name = name.decode()
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.exists(alive_key(self.prefix, name))
            pipe.get(working_key(self.prefix, name))
            pipe.llen(lane_key(self.prefix, name))
            alive, working_on, waiting = pipe.execute()
        if not alive or waiting:
            return None  # no lane served (gone, or a worker without one), or a click already waits there
        if working_on is None or working_on.decode() == f"{self.prefix}:interactive":
            return name  # idle, or on a click: this one waits milliseconds
        return None  # a batch or training job: seconds to minutes


def working_key(prefix: str, worker_name: str) -> str:
    """Where worker ``worker_name`` records the queue of the job it is running (backend.worker)."""
    return f"{prefix}:working:{worker_name}"
