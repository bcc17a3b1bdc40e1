"""Where requests to Label Studio go and which credential they carry: the one rule, for server and workers.

The rule (README, "Security"):

* ``LABEL_STUDIO_URL`` set: every request to Label Studio goes to that origin, with ``LABEL_STUDIO_API_KEY``
  or, when no key is configured, the ``access_token`` of the project's ``/setup``. The ``/setup`` hostname
  is ignored.
* ``LABEL_STUDIO_URL`` empty: the configured key is never sent anywhere (nothing says where Label Studio
  is). A project's ``/setup`` hostname is used with the ``access_token`` of that same ``/setup`` only, so
  whoever names a host in ``/setup`` can only send that host its own token.

Jobs carry no credential, only the project id: a worker applies this rule with its own settings and the
``/setup`` information the server keeps in Redis (:class:`SetupRegistry`), which holds only what the
configured settings do not already cover, for ``SETUP_TTL_S``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import redis

from backend.credentials import LabelStudioCredentials
from backend.errors import ServiceError
from backend.settings import Settings

log = logging.getLogger(__name__)
#: Seconds Redis keeps a project's /setup information after Label Studio last sent it or the server last
#: used it (Label Studio sends /setup as often as /health while a project is open). Twelve hours cover a
#: training request's queued follow-up and its rescore (<= 6 h each, backend.training_scheduler.LOCK_SECONDS).
SETUP_TTL_S = 12 * 3600
#: Projects whose /setup information a process keeps in memory (the most recently set up), and the longest
#: hostname and token kept: /setup is unauthenticated unless Basic auth is set.
MAX_LOCAL_SETUPS = 10_000
MAX_SETUP_FIELD_CHARS = 2048


@dataclass(frozen=True)
class SetupInfo:
    """What Label Studio told us in ``/setup`` for one project: its URL and (legacy) access token."""

    hostname: str | None = None
    access_token: str | None = None


class SetupRegistry:
    """``/setup`` information by project id, kept in this process and, with Redis, in the hash
    ``<prefix>:setup:<project>`` (fields ``hostname``, ``access_token``; ``SETUP_TTL_S``), where workers
    read it."""

    def __init__(self, connection: redis.Redis | None = None, prefix: str = "segmask") -> None:
        self.connection = connection
        self.prefix = f"{prefix}:setup"
        self._local: OrderedDict[str, SetupInfo] = OrderedDict()

    def remember(self, project: str, info: SetupInfo) -> None:
        """Keep ``info`` for ``project`` (an empty ``info`` forgets the project); this process keeps the
        :data:`MAX_LOCAL_SETUPS` most recent."""
        self._local[project] = info
        self._local.move_to_end(project)
        while len(self._local) > MAX_LOCAL_SETUPS:
            self._local.popitem(last=False)
        if self.connection is not None:
            self._store(project, info)

    def get(self, project: str) -> SetupInfo | None:
        """With Redis, its copy (what every process sees); without, this process's."""
        if self.connection is None:
            return self._local.get(project)
        fields = {k.decode(): v.decode() for k, v in self.connection.hgetall(self._key(project)).items()}
        return SetupInfo(fields.get("hostname"), fields.get("access_token")) if fields else None

    def keep_alive(self, project: str) -> None:
        """Give the Redis copy of ``project`` another ``SETUP_TTL_S``; when Redis has none (it restarted
        empty, or the copy expired) but this process has one, write it back so that workers find it."""
        if self.connection is None or self.connection.expire(self._key(project), SETUP_TTL_S):
            return
        if project in self._local:
            self._store(project, self._local[project])

    def _key(self, project: str) -> str:
        return f"{self.prefix}:{project}"

    def _store(self, project: str, info: SetupInfo) -> None:
        fields = {k: v for k, v in (("hostname", info.hostname), ("access_token", info.access_token)) if v}
        with self.connection.pipeline() as pipe:
            pipe.delete(self._key(project))
            if fields:
                pipe.hset(self._key(project), mapping=fields)
                pipe.expire(self._key(project), SETUP_TTL_S)
            pipe.execute()


@dataclass(frozen=True)
class ProjectAccess:
    """How to reach one project's Label Studio: its base URL (``""`` when unknown) and the credentials that
    may be sent there (None: none)."""

    url: str
    credentials: LabelStudioCredentials | None

    def authorization(self) -> str | None:
        """The ``Authorization`` value for ``url`` (a personal access token is exchanged as needed)."""
        return self.credentials.authorization() if self.credentials is not None else None

    @property
    def can_read_api(self) -> bool:
        """True when both a URL and a credential are known (the API needs both)."""
        return bool(self.url) and self.credentials is not None and self.credentials.kind != "none"

    def client(self) -> Any:
        """A label-studio-sdk client of the project's Label Studio; 409 ``no_label_studio_access`` if none."""
        if not self.can_read_api:
            raise ServiceError(
                409,
                "no_label_studio_access",
                "reading the Label Studio API needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or a /setup "
                "from Label Studio with a legacy token)",
            )
        return self.credentials.client()


class LabelStudioAccess:
    """Applies the module's rule for one deployment: ``settings`` (both read by the server and by every
    worker) plus the projects' ``/setup`` information in ``setups``."""

    def __init__(self, settings: Settings, setups: SetupRegistry) -> None:
        self.settings = settings
        self.setups = setups
        self._configured = LabelStudioCredentials(settings.label_studio_url, settings.label_studio_api_key)
        if settings.label_studio_api_key and not settings.label_studio_url:
            log.warning(
                "LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not: the key is never sent; set "
                "LABEL_STUDIO_URL to use it"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> LabelStudioAccess:
        """The access of a process that learns no /setup itself (a worker): Redis's registry, if any."""
        connection = redis.Redis.from_url(settings.redis_url) if settings.redis_url else None
        return cls(settings, SetupRegistry(connection, settings.queue_prefix))

    @property
    def _setup_needed(self) -> bool:
        """False when the settings name both Label Studio and a key: then /setup information is never used."""
        return not (self.settings.label_studio_url and self._configured.kind != "none")

    def remember_setup(self, project: str, hostname: str | None, access_token: str | None) -> None:
        """Keep from a ``/setup`` only what this rule may use: the hostname without ``LABEL_STUDIO_URL``, the
        token without a configured URL and key."""
        if not self._setup_needed:
            return
        self.setups.remember(
            project, SetupInfo(None if self.settings.label_studio_url else hostname, access_token)
        )

    def keep_alive(self, project: str) -> None:
        """Called by the server before it hands a project's work to a job (``SetupRegistry.keep_alive``)."""
        if self._setup_needed:
            self.setups.keep_alive(project)

    def for_project(self, project: str) -> ProjectAccess:
        """Where ``project``'s Label Studio is and what may be sent there (the module's rule)."""
        url = self.settings.label_studio_url
        if not self._setup_needed:
            return ProjectAccess(url, self._configured)
        setup = self.setups.get(project) or SetupInfo()
        base = url or setup.hostname or ""
        token = setup.access_token if base else None
        return ProjectAccess(base, LabelStudioCredentials(base, token) if token else None)

    def require_api(self, project: str) -> None:
        """409 ``no_label_studio_access`` unless a job could read ``project`` through the API."""
        self.keep_alive(project)
        if not self.for_project(project).can_read_api:
            raise ServiceError(
                409,
                "no_label_studio_access",
                f"cannot train project {project}: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or let "
                "Label Studio send /setup with a legacy token first)",
            )
