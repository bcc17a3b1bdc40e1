"""The Flask app factory: routes only (/health /setup /predict /webhook /metrics /versions /jobs; admin:
/train).

``create_app()`` reads :class:`~backend.settings.Settings` once. With ``SEGMASK_REDIS_URL`` set, jobs go to
RQ workers; without it (embedded mode) the model is loaded here, at start-up, never inside a request:
Label Studio gives /health 1 s and /setup 3 s and calls them constantly.

Every error is JSON ``{"error": kind, "message": ...}`` with a 4xx/5xx status, logged and counted in
/metrics by kind, and the server goes on serving.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import threading
import time
from collections import deque

import redis
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.dispatcher import Dispatcher, build_dispatcher
from backend.errors import ServiceError, bad_request
from backend.metrics import READY_AT, Metrics
from backend.predict import PredictService
from backend.settings import Settings
from backend.training_board import JobBoard
from backend.training_scheduler import TrainingScheduler
from backend.versions import open_store, versions_json
from backend.webhooks import KnownProjects, WebhookHandler, action_label, project_id, setup_project_id

log = logging.getLogger(__name__)
# Routes Label Studio calls without Basic auth even when it is configured (/webhook has its own secret).
UNAUTHENTICATED = {"/webhook"}
WEBHOOK_TOKEN_HEADER = "X-Segmask-Webhook-Token"
# Label Studio's bodies nest about 8 levels deep; deeper ones are refused before anything walks them.
MAX_JSON_DEPTH = 100


def create_app(settings: Settings | None = None, dispatcher: Dispatcher | None = None) -> Flask:
    """The backend as a WSGI app; ``dispatcher`` overrides the one the settings choose (tests, benches)."""
    settings = settings or Settings.from_env()
    dispatcher = dispatcher or build_dispatcher(settings)
    app = Flask("segmask")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    connection = dispatcher.connection
    service = PredictService(settings, dispatcher, dispatcher.access)
    store = open_store(settings)
    metrics = Metrics(dispatcher.queue_depths if connection is not None else None, store.current_version)
    scheduler = TrainingScheduler(settings, connection, dispatcher.rescore_in_process, dispatcher.access)
    known = KnownProjects(connection, settings.queue_prefix)
    webhooks = WebhookHandler(scheduler, service, known)
    events: deque[dict] = deque(maxlen=200)
    app.extensions["segmask"] = {
        "settings": settings,
        "service": service,
        "metrics": metrics,
        "events": events,
    }

    _install_hooks(app, settings, metrics)
    _install_error_handlers(app, metrics)

    @app.get("/health")
    def health():
        # From memory only: no model lock, no Redis (Label Studio gives it 1 s, however busy the model is).
        return jsonify(status="UP", model_class="segmask", mode=dispatcher.mode)

    @app.post("/setup")
    def setup():
        body = _json_body(required=False) or {}
        if isinstance(body, dict):
            service.remember_setup(body)
            if (project := setup_project_id(body)) is not None:
                known.add(project)
        return jsonify(model_version=store.current_version())

    @app.post("/predict")
    def predict():
        kind, response, outcomes = service.predict(_json_body())
        g.mode = kind.queue
        for outcome in outcomes:
            metrics.job_queued.labels(kind.name).observe(outcome.queued)
            metrics.job_running.labels(kind.name).observe(outcome.running)
        metrics.predicted_regions.labels(kind.queue).inc(sum(len(r["result"]) for r in response["results"]))
        return jsonify(response)

    @app.post("/webhook")
    def webhook():
        _check_webhook_token(settings)
        body = _json_body()
        if not isinstance(body, dict) or not isinstance(body.get("action"), str):
            raise bad_request("a webhook body is a JSON object with an 'action' string", "bad_webhook")
        action = action_label(body["action"])
        events.append({"action": action, "project": project_id(body), "received": time.time()})
        metrics.webhooks.labels(action).inc()
        answer = webhooks.handle(body)
        log.info(
            "webhook %s for project %s: %s", action, answer["project"], answer.get("training", "recorded")
        )
        return jsonify(answer), 200

    @app.post("/train")
    def train():
        _check_admin(settings)
        body = _json_body()
        project = body.get("project") if isinstance(body, dict) else None
        if not isinstance(project, int) or isinstance(project, bool):
            raise bad_request('POST /train needs {"project": <Label Studio project id>}', "bad_train_request")
        state = scheduler.request(webhooks.train_request(project, "POST /train"))
        return jsonify(project=project, training=state), 202

    @app.get("/jobs")
    def jobs():
        return jsonify(jobs=JobBoard(store).all())

    @app.get("/versions")
    def versions():
        return jsonify(versions_json(store))

    @app.get("/metrics")
    def prometheus():
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4")

    return app


def _json_body(required: bool = True) -> object:
    """The request's JSON (any content type, as Label Studio's clients vary); a 400 if it is not JSON or
    nests deeper than ``MAX_JSON_DEPTH``."""
    data = _body_bytes()
    if not data:
        if required:
            raise bad_request("the request body is empty; expected JSON", "malformed_json")
        return None
    try:
        body = json.loads(data)
        too_deep = _nested_deeper_than(body, MAX_JSON_DEPTH)
    except RecursionError:
        body, too_deep = None, True
    except ValueError:  # not JSON, not UTF-8, or an integer of thousands of digits
        body, too_deep = None, False
    if too_deep:
        raise bad_request(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep", "json_too_deep")
    if body is None:
        raise bad_request("the request body is not valid JSON", "malformed_json")
    return body


def _body_bytes() -> bytes:
    """The request body; a 413 when it is over the limit, also for a chunked body (no Content-Length),
    which werkzeug would otherwise cut at the limit without a word."""
    data = request.get_data(cache=True)
    limit = request.max_content_length
    chunked_at_limit = limit is not None and len(data) >= limit and request.content_length is None
    if chunked_at_limit and request.input_stream.read(1):
        raise ServiceError(
            413, "body_too_large", f"the request body is over SEGMASK_MAX_BODY_BYTES ({limit} bytes)"
        )
    return data


def _nested_deeper_than(value: object, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) has containers more than ``limit`` levels deep; no recursion."""
    level, containers = 0, [value] if isinstance(value, dict | list) else []
    while containers:
        level += 1
        if level > limit:
            return True
        children = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
        containers = [c for c in children if isinstance(c, dict | list)]
    return False


def predict_request_limit(settings: Settings) -> int:
    """How many /predict requests one server process serves at once: SEGMASK_MAX_PREDICT_REQUESTS, or
    SEGMASK_SERVER_THREADS less a quarter. The other threads stay free for /health and the other quick
    routes, which would otherwise queue behind requests waiting for the model; a ValueError when no thread
    would stay free, or no /predict be served."""
    threads = settings.server_threads
    limit = settings.max_predict_requests or threads - max(1, threads // 4)
    if not 1 <= limit < threads:
        raise ValueError(
            f"SEGMASK_MAX_PREDICT_REQUESTS ({limit}) must be at least 1 and below SEGMASK_SERVER_THREADS "
            f"({threads}), so that threads stay free for /health"
        )
    return limit


def _install_hooks(app: Flask, settings: Settings, metrics: Metrics) -> None:
    limit = predict_request_limit(settings)
    predict_slots = threading.BoundedSemaphore(limit)

    @app.before_request
    def start():
        now = time.perf_counter()
        # Latency counts from when the server had the request ready for a thread (backend.server's worker),
        # so time spent waiting for a free thread is in it; other servers (--dev, tests) do not say.
        g.started = request.environ.get(READY_AT, now)
        g.mode = "-"
        metrics.thread_wait.observe(now - g.started)
        if settings.basic_auth_user and request.path not in UNAUTHENTICATED and not _basic_auth_ok(settings):
            raise ServiceError(401, "unauthorized", "HTTP Basic credentials are missing or wrong")
        if request.endpoint == "predict":
            if not predict_slots.acquire(blocking=False):
                raise ServiceError(
                    503,
                    "busy",
                    f"this server process is already serving {limit} /predict requests "
                    "(SEGMASK_MAX_PREDICT_REQUESTS); retry in a moment",
                )
            g.predict_slot = True

    @app.teardown_request
    def release(exc: BaseException | None) -> None:
        if g.pop("predict_slot", False):
            predict_slots.release()

    @app.after_request
    def record(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unknown"
        metrics.requests.labels(route, str(response.status_code)).inc()
        if hasattr(g, "started"):
            elapsed = time.perf_counter() - g.started
            metrics.latency.labels(route, g.mode).observe(elapsed)
            log.info("%s %s %s %.0f ms", request.method, request.path, response.status_code, elapsed * 1000)
        return response


def _check_admin(settings: Settings) -> None:
    """Admin routes need the header ``X-Segmask-Admin-Token: <SEGMASK_ADMIN_TOKEN>``; unset, they are off."""
    if not settings.admin_token:
        raise ServiceError(
            403, "admin_disabled", "admin routes are off: set SEGMASK_ADMIN_TOKEN to enable them"
        )
    given = request.headers.get("X-Segmask-Admin-Token", "")
    if not hmac.compare_digest(given.encode(), settings.admin_token.encode()):
        raise ServiceError(401, "unauthorized", "X-Segmask-Admin-Token is missing or wrong")


def _check_webhook_token(settings: Settings) -> None:
    """With ``SEGMASK_WEBHOOK_SECRET`` set, /webhook needs it as ``?token=`` or ``X-Segmask-Webhook-Token``,
    or the Basic auth pair (the Train button's call carries the model's Basic auth, not the webhook's)."""
    if not settings.webhook_secret:
        return
    given = request.args.get("token") or request.headers.get(WEBHOOK_TOKEN_HEADER, "")
    if hmac.compare_digest(given.encode(), settings.webhook_secret.encode()):
        return
    if settings.basic_auth_user and _basic_auth_ok(settings):
        return
    raise ServiceError(
        401, "unauthorized", f"the webhook token (?token= or {WEBHOOK_TOKEN_HEADER}) is missing or wrong"
    )


def _basic_auth_ok(settings: Settings) -> bool:
    """Whether the request carries the configured HTTP Basic pair (compared in constant time)."""
    header = request.headers.get("Authorization", "")
    user = password = ""
    if header.startswith("Basic "):
        # binascii.Error and UnicodeDecodeError are ValueErrors, and so is a header that is not ASCII.
        with contextlib.suppress(ValueError):
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    return hmac.compare_digest(user.encode(), settings.basic_auth_user.encode()) & hmac.compare_digest(
        password.encode(), settings.basic_auth_pass.encode()
    )


def _install_error_handlers(app: Flask, metrics: Metrics) -> None:
    def answer(status: int, kind: str, message: str) -> tuple[Response, int]:
        route = request.url_rule.rule if request.url_rule else "unknown"
        metrics.errors.labels(route, kind).inc()
        response = jsonify(error=kind, message=message)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Basic realm="segmask"'
        return response, status

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError):
        level = logging.WARNING if exc.status < 500 else logging.ERROR
        log.log(level, "%s %s -> %s %s: %s", request.method, request.path, exc.status, exc.kind, exc.message)
        return answer(exc.status, exc.kind, exc.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        kind = {413: "body_too_large"}.get(exc.code, (exc.name or "http_error").lower().replace(" ", "_"))
        log.warning("%s %s -> %s %s", request.method, request.path, exc.code, exc.description)
        return answer(exc.code or 500, kind, exc.description or exc.name)

    @app.errorhandler(redis.RedisError)
    def redis_down(exc: redis.RedisError):
        log.error("%s %s: Redis unavailable: %s", request.method, request.path, exc)
        return answer(
            503,
            "redis_unavailable",
            f"Redis is unavailable ({exc.__class__.__name__}: {exc}); retry when it is back",
        )

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("%s %s failed", request.method, request.path)
        return answer(500, "internal", f"internal error ({exc.__class__.__name__}); see the backend log")
