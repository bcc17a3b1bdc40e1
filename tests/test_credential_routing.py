"""Where Label Studio credentials go, and what Redis keeps of them (README, "Security").

The configured LABEL_STUDIO_API_KEY goes only to LABEL_STUDIO_URL's origin, never to a host an
(unauthenticated) /setup names; a /setup hostname only ever gets the token of that same /setup. Real HTTP
servers on 127.0.0.1 play Label Studio and the host a /setup names, and record every header they receive;
the app runs in embedded mode on the real model, or with a real Redis (no worker needed for what is
checked there).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from ls_bodies import captured, keypoints
from rq_worker import REDIS_URL, require_redis, stored_under

from backend.app import create_app
from backend.settings import Settings

KEY = "c0ffee00" * 5  # the configured LABEL_STUDIO_API_KEY (a legacy token)
SETUP_TOKEN = "5e7a9" * 8  # the access_token Label Studio sends in /setup
IMAGE = 9  # COCO128 000000000009.jpg


class RecordingLabelStudio(ThreadingHTTPServer):
    """Serves uploads (``/data/upload/1/<file>``) to ``Token <accepts>`` like Label Studio, answers 404 to
    anything else, and records every request's method, path and headers."""

    daemon_threads = True

    def __init__(self, images: Path, accepts: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.images = images
        self.accepts = accepts
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def authorizations(self) -> list[str | None]:
        """The Authorization header of each request received, in order (None: none sent)."""
        return [headers.get("authorization") for _, _, headers in self.requests]


class RecordingHandler(BaseHTTPRequestHandler):
    server: RecordingLabelStudio

    def log_message(self, *args) -> None:
        pass

    def _record(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.requests.append((self.command, self.path, headers))

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._record()
        name = self.path.removeprefix("/data/upload/1/")
        if name != self.path and self.headers.get("Authorization") == f"Token {self.server.accepts}":
            return self._send(200, (self.server.images / name).read_bytes())
        status = 401 if name != self.path else 404
        self._send(status, json.dumps({"detail": "recorded"}).encode())

    def do_POST(self) -> None:  # noqa: N802
        self._record()
        self._send(404, b'{"detail": "recorded"}')

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def serve(coco128: Path):
    """``serve(accepts=None)``: a started RecordingLabelStudio, shut down after the test."""
    servers: list[RecordingLabelStudio] = []

    def start(accepts: str | None = None) -> RecordingLabelStudio:
        server = RecordingLabelStudio(coco128 / "images", accepts)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def key_without_url(tmp_path_factory):
    """LABEL_STUDIO_API_KEY set, LABEL_STUDIO_URL empty (a documented set-up); embedded, with a store."""
    settings = Settings.from_env(
        {}, label_studio_api_key=KEY, model_store=str(tmp_path_factory.mktemp("store"))
    )
    return create_app(settings).test_client()


def _setup(client, project: int, hostname: str, token: str | None = None) -> None:
    body = {**captured("setup"), "project": f"{project}.1795402219", "hostname": hostname}
    body.pop("access_token")
    if token is not None:
        body["access_token"] = token
    assert client.post("/setup", json=body).status_code == 200


def _click(client, project: int):
    body = keypoints(captured("predict-interactive-keypoint"), IMAGE, [(50, 50, True)], label="person")
    body["project"] = f"{project}.1795402219"
    return client.post("/predict", json=body)


def _wait_for_training(client, project: int, timeout: float = 60) -> None:
    """Until the project's training job has ended (or ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {j["project"]: j for j in client.get("/jobs").get_json()["jobs"]}
        if jobs.get(project, {}).get("state") in ("failed", "published", "kept"):
            return
        time.sleep(0.2)


def test_a_setup_hostname_never_receives_the_configured_key_with_images(key_without_url, serve):
    elsewhere = serve()
    _setup(key_without_url, 5, elsewhere.url)
    answer = _click(key_without_url, 5)
    assert answer.status_code == 422 and answer.get_json()["error"] == "image_forbidden"
    assert elsewhere.authorizations() == [None]


def test_a_setup_hostname_gets_only_the_token_of_its_own_setup(key_without_url, serve):
    label_studio = serve(accepts=SETUP_TOKEN)
    _setup(key_without_url, 6, label_studio.url, SETUP_TOKEN)
    answer = _click(key_without_url, 6)
    assert answer.status_code == 200, answer.get_json()
    assert label_studio.authorizations() == [f"Token {SETUP_TOKEN}"]


def test_the_train_button_never_sends_the_configured_key_to_a_setup_hostname(key_without_url, serve):
    elsewhere = serve()
    _setup(key_without_url, 7, elsewhere.url)
    answer = key_without_url.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    if answer.status_code == 200:  # a job was started: let it talk to whoever it talks to
        _wait_for_training(key_without_url, 7)
    assert all(KEY not in str(headers) for _, _, headers in elsewhere.requests)
    assert answer.status_code == 409 and answer.get_json()["error"] == "no_label_studio_access"
    assert elsewhere.requests == []


def test_the_train_button_reads_a_setup_host_with_the_token_of_its_setup_only(key_without_url, serve):
    label_studio = serve(accepts=SETUP_TOKEN)
    _setup(key_without_url, 9, label_studio.url, SETUP_TOKEN)
    answer = key_without_url.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 9}})
    assert answer.status_code == 200 and answer.get_json()["training"] == "queued"
    _wait_for_training(key_without_url, 9)
    assert ("GET", "/api/projects/9/") in {(method, path) for method, path, _ in label_studio.requests}
    assert set(label_studio.authorizations()) == {f"Token {SETUP_TOKEN}"}


def test_the_configured_key_goes_to_label_studio_url_and_nowhere_else(serve):
    label_studio, elsewhere = serve(accepts=KEY), serve()
    settings = Settings.from_env({}, label_studio_url=label_studio.url, label_studio_api_key=KEY)
    client = create_app(settings).test_client()
    _setup(client, 8, elsewhere.url, SETUP_TOKEN)
    answer = _click(client, 8)
    assert answer.status_code == 200, answer.get_json()
    assert label_studio.authorizations() == [f"Token {KEY}"]
    assert elsewhere.requests == []


# ---- what Redis keeps ------------------------------------------------------------------------------------
@pytest.fixture
def queued_app():
    """``queued_app(**settings)``: ``(client, prefix, connection)``, the app with a real Redis on a fresh
    prefix (no worker listens: only what is stored is checked); the prefix's keys are deleted afterwards."""
    connection = require_redis()
    prefix = f"segmask-creds-{uuid.uuid4().hex[:8]}"

    def make(**overrides):
        settings = Settings.from_env({}, redis_url=REDIS_URL, queue_prefix=prefix, **overrides)
        return create_app(settings).test_client(), prefix, redis.Redis.from_url(REDIS_URL)

    yield make
    for key in stored_under(connection, prefix):
        connection.delete(key)


def test_a_setup_token_is_kept_in_redis_for_hours_not_days(queued_app):
    client, prefix, connection = queued_app()
    _setup(client, 1, "http://127.0.0.1:8080", SETUP_TOKEN)
    assert connection.hget(f"{prefix}:setup:1", "access_token") == SETUP_TOKEN.encode()
    assert 0 < connection.ttl(f"{prefix}:setup:1") <= 12 * 3600


def test_with_label_studio_url_and_key_configured_redis_keeps_nothing_of_a_setup(queued_app):
    client, prefix, connection = queued_app(
        label_studio_url="http://127.0.0.1:8080", label_studio_api_key=KEY
    )
    _setup(client, 1, "http://127.0.0.1:8081", SETUP_TOKEN)
    assert not connection.exists(f"{prefix}:setup:1")
    assert not any(SETUP_TOKEN.encode() in value for value in stored_under(connection, prefix).values())


def test_a_setup_lost_by_redis_is_written_back_by_the_server_that_learnt_it(queued_app):
    """After a Redis restart, the next /predict puts the project's /setup back where workers read it."""
    client, prefix, connection = queued_app()
    _setup(client, 1, "http://127.0.0.1:8080", SETUP_TOKEN)
    connection.delete(f"{prefix}:setup:1")
    assert _click(client, 1).get_json()["error"] == "no_worker"
    assert connection.hget(f"{prefix}:setup:1", "access_token") == SETUP_TOKEN.encode()


def test_training_jobs_and_follow_ups_in_redis_hold_no_key(queued_app, tmp_path):
    client, prefix, connection = queued_app(
        label_studio_url="http://127.0.0.1:8080", label_studio_api_key=KEY, model_store=str(tmp_path)
    )
    _setup(client, 1, "http://127.0.0.1:8080", SETUP_TOKEN)
    train = {"action": "START_TRAINING", "project": {"id": 1}}
    assert client.post("/webhook", json=train).get_json()["training"] == "queued"
    assert client.post("/webhook", json=train).get_json()["training"] == "follow-up scheduled"
    stored = stored_under(connection, prefix)
    assert any(key.startswith("rq:job:train-1-") for key in stored)
    assert [key for key, value in stored.items() if KEY.encode() in value] == []


def test_a_process_keeps_setup_information_of_a_bounded_number_of_projects(monkeypatch):
    from backend import access

    monkeypatch.setattr(access, "MAX_LOCAL_SETUPS", 3)
    registry = access.SetupRegistry()
    for project in range(5):
        registry.remember(str(project), access.SetupInfo("http://ls.example", f"token-{project}"))
    assert [registry.get(str(p)) is not None for p in range(5)] == [False, False, True, True, True]


def test_setup_values_longer_than_the_limit_are_not_kept():
    from backend.access import MAX_SETUP_FIELD_CHARS
    from backend.predict import _setup_field

    assert _setup_field("x" * MAX_SETUP_FIELD_CHARS) is not None
    assert _setup_field("x" * (MAX_SETUP_FIELD_CHARS + 1)) is None
    assert _setup_field(["not", "a", "string"]) is None and _setup_field("") is None
