"""/webhook is reachable without Basic auth, so what it accepts is bounded: an optional shared secret,
metric series only for Label Studio's actions, expiring change counters, and training only for projects
that sent /setup (real Redis, no worker, so queued jobs stay where the test can see them)."""

import base64
import socket
import threading
import time
import uuid

import pytest
import redis
from ls_bodies import captured
from rq import Queue
from rq.serializers import JSONSerializer
from rq_worker import REDIS_URL, require_redis

from backend.app import create_app
from backend.settings import Settings
from backend.training_scheduler import TrainingScheduler

SECRET = "hook-s3cret"


def _settings(tmp_path, **overrides) -> Settings:
    require_redis()
    values = {
        "redis_url": REDIS_URL,
        "queue_prefix": f"hook-{uuid.uuid4().hex[:8]}",
        "model_store": str(tmp_path / "store"),
        "retrain_every": 3,
        "label_studio_url": "http://127.0.0.1:1",
        "label_studio_api_key": "k" * 40,
        **overrides,
    }
    return Settings.from_env({}, **values)


def _client(settings: Settings, set_up: tuple[int, ...] = (1,)):
    client = create_app(settings).test_client()
    for project in set_up:
        assert (
            client.post("/setup", json=dict(captured("setup"), project=f"{project}.1795402219")).status_code
            == 200
        )
    return client


def _training_jobs(settings: Settings) -> list:
    connection = redis.Redis.from_url(REDIS_URL)
    return Queue(
        f"{settings.queue_prefix}:training", connection=connection, serializer=JSONSerializer
    ).get_jobs()


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(
    "path, headers",
    [
        ("/webhook", {}),
        ("/webhook?token=wrong", {}),
        ("/webhook", {"X-Segmask-Webhook-Token": "wrong"}),
        ("/webhook", {"X-Segmask-Webhook-Token": "é"}),
    ],
)
def test_with_a_secret_a_webhook_without_it_is_401_and_does_nothing(tmp_path, path, headers):
    settings = _settings(tmp_path, webhook_secret=SECRET)
    client = _client(settings)
    answer = client.post(path, json=captured("webhook-start_training"), headers=headers)
    assert answer.status_code == 401 and answer.get_json()["error"] == "unauthorized"
    assert "token" in answer.get_json()["message"]
    assert _training_jobs(settings) == []


@pytest.mark.parametrize(
    "path, headers", [(f"/webhook?token={SECRET}", {}), ("/webhook", {"X-Segmask-Webhook-Token": SECRET})]
)
def test_with_a_secret_a_webhook_carrying_it_in_the_url_or_a_header_is_served(tmp_path, path, headers):
    settings = _settings(tmp_path, webhook_secret=SECRET)
    answer = _client(settings).post(path, json=captured("webhook-start_training"), headers=headers)
    assert answer.status_code == 200 and answer.get_json()["training"] == "queued"


def test_the_train_buttons_call_passes_with_the_models_basic_auth(tmp_path):
    settings = _settings(tmp_path, webhook_secret=SECRET, basic_auth_user="ls", basic_auth_pass="pw")
    client = create_app(settings).test_client()
    client.post("/setup", json=captured("setup"), headers=_basic("ls", "pw"))
    body = captured("webhook-start_training")
    assert client.post("/webhook", json=body, headers=_basic("ls", "wrong")).status_code == 401
    answer = client.post("/webhook", json=body, headers=_basic("ls", "pw"))
    assert answer.status_code == 200 and answer.get_json()["training"] == "queued"


def test_unknown_actions_are_counted_as_other_and_make_no_metric_series(tmp_path):
    client = _client(_settings(tmp_path))
    actions = [f"NOT_AN_ACTION_{n}_{'x' * 1000}" for n in range(5)]
    for action in actions:
        assert client.post("/webhook", json={"action": action, "project": 1}).status_code == 200
    client.post("/webhook", json=captured("webhook-annotation_created"))
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'segmask_webhook_events_total{action="other"} 5.0' in metrics
    assert 'segmask_webhook_events_total{action="ANNOTATION_CREATED"} 1.0' in metrics
    assert "NOT_AN_ACTION" not in metrics


def test_change_counters_expire(tmp_path):
    settings = _settings(tmp_path, retrain_count_ttl=120)
    client = _client(settings)
    assert client.post("/webhook", json=captured("webhook-annotation_created")).status_code == 200
    ttl = redis.Redis.from_url(REDIS_URL).ttl(f"{settings.queue_prefix}:train:1:changes")
    assert 0 < ttl <= 120


def test_webhooks_of_projects_without_setup_count_nothing_and_train_nothing(tmp_path):
    settings = _settings(tmp_path)
    client = _client(settings, set_up=())
    body = captured("webhook-annotation_created")
    for project in range(2, 12):
        body["project"]["id"] = project
        for _ in range(settings.retrain_every):
            answer = client.post("/webhook", json=body)
            assert answer.status_code == 200 and "training" not in answer.get_json()
    connection = redis.Redis.from_url(REDIS_URL)
    assert list(connection.scan_iter(f"{settings.queue_prefix}:*")) == []
    assert _training_jobs(settings) == []


def test_the_train_button_of_a_project_without_setup_is_a_clear_409(tmp_path):
    settings = _settings(tmp_path)
    client = _client(settings, set_up=(2,))
    answer = client.post("/webhook", json=captured("webhook-start_training"))
    assert answer.status_code == 409 and answer.get_json()["error"] == "unknown_project"
    assert "/setup" in answer.get_json()["message"]
    assert _training_jobs(settings) == []


def _train(client, project: int):
    body = captured("webhook-start_training")
    body["project"]["id"] = project
    return client.post("/webhook", json=body)


def test_training_jobs_are_capped_across_projects(tmp_path):
    settings = _settings(tmp_path, max_training_jobs=2, admin_token="admin")
    client = _client(settings, set_up=(1, 2, 3))
    assert [_train(client, p).get_json()["training"] for p in (1, 2)] == ["queued", "queued"]
    refused = _train(client, 3)
    assert refused.status_code == 429 and refused.get_json()["error"] == "training_busy"
    assert "SEGMASK_MAX_TRAINING_JOBS" in refused.get_json()["message"]
    admin = client.post("/train", json={"project": 4}, headers={"X-Segmask-Admin-Token": "admin"})
    assert admin.status_code == 429
    assert _train(client, 1).get_json()["training"] == "follow-up scheduled"
    assert len(_training_jobs(settings)) == 2


def test_a_finished_job_frees_its_slot_and_a_follow_up_keeps_it(tmp_path):
    settings = _settings(tmp_path, max_training_jobs=1)
    client = _client(settings, set_up=(1, 2))
    scheduler = TrainingScheduler(settings, redis.Redis.from_url(REDIS_URL))
    assert _train(client, 1).get_json()["training"] == "queued"
    assert _train(client, 1).get_json()["training"] == "follow-up scheduled"
    scheduler.finished_rq(1)  # the follow-up is queued in the slot of the job that ended
    assert len(_training_jobs(settings)) == 2 and _train(client, 2).status_code == 429
    scheduler.finished_rq(1)
    assert _train(client, 2).get_json()["training"] == "queued"


def test_the_slot_of_a_job_that_died_is_taken_over(tmp_path):
    settings = _settings(tmp_path, max_training_jobs=1)
    client = _client(settings, set_up=(1, 2))
    assert _train(client, 1).get_json()["training"] == "queued"
    [job] = _training_jobs(settings)
    job.cancel()
    assert _train(client, 2).get_json()["training"] == "queued"


class StallingLabelStudio:
    """A TCP server that takes connections and answers nothing until ``release()``, then closes them all:
    a Label Studio that keeps training jobs busy for as long as a test needs."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.released = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if self.released.is_set():
                conn.close()
            else:
                self.held.append(conn)

    def release(self) -> None:
        self.released.set()
        for conn in self.held:
            conn.close()

    def close(self) -> None:
        self.release()
        self.server.close()


def _training_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("train-")]


def _wait_for_no_training_thread(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _training_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _training_threads() == []


def test_embedded_mode_runs_at_most_the_cap_of_training_threads(tmp_path):
    stalling = StallingLabelStudio()
    try:
        client = create_app(
            Settings.from_env({}, model_store=str(tmp_path / "store"), max_training_jobs=2)
        ).test_client()
        for project in range(1, 6):
            setup = dict(
                captured("setup"), project=f"{project}.1", hostname=stalling.url, access_token="k" * 40
            )
            client.post("/setup", json=setup)
        assert [_train(client, p).status_code for p in range(1, 6)] == [200, 200, 429, 429, 429]
        assert _train(client, 1).get_json()["training"] == "follow-up scheduled"
        assert len(_training_threads()) == 2
        stalling.release()
        _wait_for_no_training_thread()
        assert _train(client, 3).get_json()["training"] == "queued"
        _wait_for_no_training_thread()
    finally:
        stalling.close()
