"""``segmask serve``: the app under gunicorn (threads, since requests mostly wait on jobs), or Flask's
development server with ``--dev``.

Embedded mode keeps the model in the server process, so it runs one gunicorn process (more would each
load the model and keep their own feature cache, and clicks would land on cold ones); with Redis, the
server holds no model and ``--workers`` processes may share the load. Their metrics are summed
(:func:`backend.metrics.share_between_processes`).

Capacity: each process has ``SEGMASK_SERVER_THREADS`` request threads. A request waiting for a worker or
the model holds one, so /predict may hold at most ``SEGMASK_MAX_PREDICT_REQUESTS`` of them (one more is
answered 503 ``busy`` at once, :func:`backend.app.predict_request_limit`) and the others stay free for
/health, /metrics, /setup and /webhook, which Label Studio expects within 1-3 s however busy the model is.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import TConn, ThreadWorker
from prometheus_client.multiprocess import mark_process_dead

from backend.app import create_app, predict_request_limit
from backend.metrics import READY_AT, share_between_processes
from backend.settings import Settings

log = logging.getLogger(__name__)
# The ready time of the connection the current thread serves (see TimedThreadWorker).
_serving = threading.local()


class TimedThreadWorker(ThreadWorker):
    """gunicorn's gthread worker, telling the app when each request became ready to be served.

    The worker hands a connection to its thread pool when a request arrives on it (``enqueue_req``); while
    every thread is busy, the request waits in the pool's queue, and a latency measured from when a thread
    took it up would leave that wait out. The hand-over time (``time.perf_counter()``) reaches the app as
    ``environ[READY_AT]``, a key no request header can set.
    """

    def enqueue_req(self, conn: TConn) -> None:
        conn.segmask_ready_at = time.perf_counter()
        super().enqueue_req(conn)

    def handle(self, conn: TConn):
        _serving.ready_at = conn.segmask_ready_at
        return super().handle(conn)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app = self.wsgi

        def stamped(environ: dict, start_response: Callable):
            environ[READY_AT] = _serving.ready_at
            return app(environ, start_response)

        self.wsgi = stamped


class _Gunicorn(BaseApplication):
    def __init__(self, settings: Settings, options: dict) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return _build_app(self.settings)


def _build_app(settings: Settings):
    """The app; in embedded mode, with this process's PyTorch threads sized before the model loads."""
    if settings.embedded:
        # Imported here: a server with Redis holds no model and must not load PyTorch.
        from backend.torch_threads import apply_torch_threads

        apply_torch_threads(settings)
    return create_app(settings)


def serve(settings: Settings, workers: int = 2, dev: bool = False) -> None:
    """Serve on ``settings.host:settings.port`` until stopped."""
    try:
        limit = predict_request_limit(settings)
    except ValueError as exc:
        raise SystemExit(f"segmask serve: {exc}") from None
    mode = (
        "embedded (no Redis; jobs run in this process)"
        if settings.embedded
        else f"RQ via {settings.redis_url}"
    )
    log.info("segmask backend on http://%s:%s, %s", settings.host, settings.port, mode)
    if dev:
        _build_app(settings).run(settings.host, settings.port, threaded=True)
        return
    processes = 1 if settings.embedded else max(workers, 1)
    log.info(
        "%d server process(es) of %d threads each; at most %d /predict requests at once per process",
        processes,
        settings.server_threads,
        limit,
    )
    options = {
        "bind": f"{settings.host}:{settings.port}",
        "workers": processes,
        "worker_class": TimedThreadWorker,
        "threads": settings.server_threads,
        # A batch request may wait up to batch_timeout for its jobs; gunicorn must not kill it first.
        "timeout": int(max(settings.batch_timeout, settings.interactive_timeout) + 30),
        "graceful_timeout": 30,
        # Label Studio and annotators' browsers reuse connections; gunicorn's 2 s default closed them
        # between two clicks, and a click sent as the server closed its connection was lost
        # (ConnectionResetError under bench/bench_load.py). Idle connections hold no thread.
        "keepalive": 75,
        "loglevel": settings.log_level.lower(),
        # The app (and in embedded mode the model) loads in the gunicorn worker, not in a master that
        # would fork after PyTorch has started its thread pools.
        "preload_app": False,
    }
    if processes > 1:
        options.update(_shared_metrics_hooks(tempfile.mkdtemp(prefix="segmask-metrics-")))
    _Gunicorn(settings, options).run()


def _shared_metrics_hooks(directory: str) -> dict[str, Callable]:
    """gunicorn hooks that make every server process keep its metrics in ``directory`` (which /metrics
    sums), forget a dead process's live gauges (prometheus_client's bookkeeping; its counts stay in the
    sums), and remove the directory when the server stops."""
    log.info("metrics of the server processes are summed in %s", directory)

    def post_fork(server, worker) -> None:
        share_between_processes(directory)

    def child_exit(server, worker) -> None:
        mark_process_dead(worker.pid, directory)

    def on_exit(server) -> None:
        shutil.rmtree(directory, ignore_errors=True)

    return {"post_fork": post_fork, "child_exit": child_exit, "on_exit": on_exit}
