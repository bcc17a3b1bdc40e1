"""One training job per project: triggers, follow-ups, counting, and the routes that start them (real Redis,
no worker on these queues, so jobs stay queued where the test can see them)."""

import threading
import uuid

import pytest
import redis
from ls_bodies import captured
from rq import Queue
from rq.serializers import JSONSerializer
from rq_worker import REDIS_URL, require_redis

from backend.errors import ServiceError
from backend.settings import Settings
from backend.training import TrainRequest
from backend.training_scheduler import TrainingScheduler


@pytest.fixture
def settings(tmp_path):
    require_redis()
    return Settings.from_env(
        {},
        redis_url=REDIS_URL,
        queue_prefix=f"sched-{uuid.uuid4().hex[:8]}",
        model_store=str(tmp_path / "store"),
        retrain_every=3,
        label_studio_url="http://127.0.0.1:1",
        label_studio_api_key="k" * 40,
        admin_token="admin",
    )


@pytest.fixture
def scheduler(settings):
    return TrainingScheduler(settings, redis.Redis.from_url(REDIS_URL))


def _training_jobs(settings) -> list:
    queue = Queue(
        f"{settings.queue_prefix}:training",
        connection=redis.Redis.from_url(REDIS_URL),
        serializer=JSONSerializer,
    )
    return queue.get_jobs()


def _req(project=1, trigger="test"):
    return TrainRequest(project, trigger)


def test_two_concurrent_triggers_give_one_job_and_one_follow_up(settings, scheduler):
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(scheduler.request(_req()))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == ["follow-up scheduled", "queued"]
    assert len(_training_jobs(settings)) == 1


def test_many_triggers_during_a_run_schedule_exactly_one_follow_up(settings, scheduler):
    for _ in range(5):
        scheduler.request(_req())
    scheduler.finished_rq(1)
    jobs = _training_jobs(settings)
    assert len(jobs) == 2 and jobs[1].args[0]["trigger"] == "follow-up"
    scheduler.finished_rq(1)
    assert len(_training_jobs(settings)) == 2


def test_projects_train_independently(settings, scheduler):
    assert scheduler.request(_req(1)) == scheduler.request(_req(2)) == "queued"


def test_a_lock_held_by_a_job_that_died_is_taken_over(settings, scheduler):
    scheduler.request(_req())
    [job] = _training_jobs(settings)
    job.cancel()
    assert scheduler.request(_req()) == "queued"


def test_every_n_annotation_changes_request_training(settings, scheduler):
    assert scheduler.annotations_changed(1, 2, _req) is None
    assert scheduler.annotations_changed(1, 1, _req) == "queued"
    assert scheduler.annotations_changed(1, 1, _req) is None


def test_without_a_model_store_training_is_refused(settings):
    scheduler = TrainingScheduler(Settings.from_env({}, redis_url=REDIS_URL), redis.Redis.from_url(REDIS_URL))
    with pytest.raises(ServiceError, match="SEGMASK_MODEL_STORE") as err:
        scheduler.request(_req())
    assert err.value.status == 409


@pytest.fixture
def client(settings):
    """The app, set up for project 1 by Label Studio (webhooks act only for projects that sent /setup)."""
    from backend.app import create_app

    client = create_app(settings).test_client()
    assert client.post("/setup", json=captured("setup")).status_code == 200
    return client


def test_the_train_button_queues_training_and_a_second_press_a_follow_up(client, settings):
    body = captured("webhook-start_training")
    assert client.post("/webhook", json=body).get_json()["training"] == "queued"
    assert client.post("/webhook", json=body).get_json()["training"] == "follow-up scheduled"
    assert len(_training_jobs(settings)) == 1
    [record] = client.get("/jobs").get_json()["jobs"]
    assert record["project"] == 1 and record["state"] == "queued" and record["trigger"] == "START_TRAINING"


def test_annotation_webhooks_count_towards_automatic_training(client, settings):
    body = captured("webhook-annotation_created")
    answers = [client.post("/webhook", json=body).get_json() for _ in range(3)]
    assert "training" not in answers[0] and answers[2]["training"] == "queued"


@pytest.mark.parametrize(
    "headers, status",
    [({}, 401), ({"X-Segmask-Admin-Token": "wrong"}, 401), ({"X-Segmask-Admin-Token": "admin"}, 202)],
)
def test_post_train_needs_the_admin_token(client, headers, status):
    assert client.post("/train", json={"project": 4}, headers=headers).status_code == status


def test_admin_routes_are_off_without_an_admin_token(settings):
    from backend.app import create_app

    client = create_app(
        Settings.from_env({}, redis_url=REDIS_URL, model_store=settings.model_store)
    ).test_client()
    answer = client.post("/train", json={"project": 4}, headers={"X-Segmask-Admin-Token": ""})
    assert answer.status_code == 403 and answer.get_json()["error"] == "admin_disabled"
