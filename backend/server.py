"""``segmask serve``: the app under gunicorn (threads, since requests mostly wait on jobs), or Flask's
development server with ``--dev``.

Embedded mode keeps the model in the server process, so it runs one gunicorn process (more would each
load the model and keep their own feature cache, and clicks would land on cold ones); with Redis, the
server holds no model and ``--workers`` processes may share the load.
"""

from __future__ import annotations

import logging

from gunicorn.app.base import BaseApplication

from backend.app import create_app
from backend.settings import Settings

log = logging.getLogger(__name__)


class _Gunicorn(BaseApplication):
    def __init__(self, settings: Settings, options: dict) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return create_app(self.settings)


def serve(settings: Settings, workers: int = 2, dev: bool = False) -> None:
    """Serve on ``settings.host:settings.port`` until stopped."""
    mode = (
        "embedded (no Redis; jobs run in this process)"
        if settings.embedded
        else f"RQ via {settings.redis_url}"
    )
    log.info("segmask backend on http://%s:%s, %s", settings.host, settings.port, mode)
    if dev:
        create_app(settings).run(settings.host, settings.port, threaded=True)
        return
    options = {
        "bind": f"{settings.host}:{settings.port}",
        "workers": 1 if settings.embedded else max(workers, 1),
        "worker_class": "gthread",
        "threads": settings.server_threads,
        # A batch request may wait up to batch_timeout for its jobs; gunicorn must not kill it first.
        "timeout": int(max(settings.batch_timeout, settings.interactive_timeout) + 30),
        "graceful_timeout": 30,
        "loglevel": settings.log_level.lower(),
        # The app (and in embedded mode the model) loads in the gunicorn worker, not in a master that
        # would fork after PyTorch has started its thread pools.
        "preload_app": False,
    }
    _Gunicorn(settings, options).run()
