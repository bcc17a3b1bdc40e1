"""The click lane (backend.click_lane): a click goes to the worker holding its image through Redis lists,
comes back as the worker's result or its refusal, runs at most once and never starts after the server has
answered.
A real Redis; the worker's runtime is a plain function taking a real model lock here (the full path, with
`segmask worker` processes, runs in test_affinity's slow test).
"""

import json
import threading
import uuid

import pytest
from rq_worker import require_redis

from backend.click_lane import ClickLane, alive_key, claim_key, lane_key, reply_key, send_click
from backend.errors import ServiceError
from backend.model_lock import ModelLock

WORKER = "segmask-lane-test"


@pytest.fixture
def redis_prefix():
    connection = require_redis()
    prefix = f"segmask-lane-{uuid.uuid4().hex[:8]}"
    yield connection, prefix
    for key in connection.scan_iter(f"{prefix}:*"):
        connection.delete(key)


class Model:
    """A stand-in for the runtime: records the requests it ran, holding a real model lock meanwhile; a
    request with ``"hold": True`` signals ``started`` and keeps the model until ``release`` is set."""

    def __init__(self) -> None:
        self.lock = ModelLock()
        self.ran: list[dict] = []
        self.started, self.release = threading.Event(), threading.Event()

    def run(self, request: dict) -> dict:
        with self.lock:
            if request.get("hold"):
                self.started.set()
                self.release.wait(10)
            if request.get("crash"):
                raise RuntimeError("boom")
            if request.get("refuse"):
                raise ServiceError(422, "bad_prompt", "the point lies outside the image")
            self.ran.append(request)
            return {"objects": [request.get("n")]}


@pytest.fixture
def lane(redis_prefix):
    connection, prefix = redis_prefix
    model = Model()
    served = ClickLane(connection, prefix, WORKER, model.run).start()
    yield connection, prefix, model, served
    served.stop(5)


def test_a_click_comes_back_with_the_workers_result_and_its_timing(lane):
    connection, prefix, model, _ = lane
    outcome = send_click(connection, prefix, WORKER, {"n": 7}, timeout=5)
    assert outcome.result() == {"objects": [7]} and model.ran == [{"n": 7}]
    assert outcome.queued >= 0 and outcome.running >= 0


def test_a_refusal_on_the_worker_comes_back_as_the_same_error(lane):
    connection, prefix, _, _ = lane
    outcome = send_click(connection, prefix, WORKER, {"refuse": True}, timeout=5)
    with pytest.raises(ServiceError) as refused:
        outcome.result()
    assert (refused.value.status, refused.value.kind) == (422, "bad_prompt")


def test_a_crash_gives_a_500_and_the_lane_serves_the_next_click(lane):
    connection, prefix, _, _ = lane
    first = send_click(connection, prefix, WORKER, {"crash": True}, timeout=5)
    second = send_click(connection, prefix, WORKER, {"n": 2}, timeout=5)
    assert isinstance(first.value, ServiceError) and first.value.status == 500
    assert "boom" in first.value.message
    assert second.result() == {"objects": [2]}


def test_a_served_lane_is_alive_and_a_stopped_one_is_not(redis_prefix):
    connection, prefix = redis_prefix
    served = ClickLane(connection, prefix, WORKER, Model().run).start()
    send_click(connection, prefix, WORKER, {"n": 1}, timeout=5).result()
    assert connection.exists(alive_key(prefix, WORKER))
    served.stop(5)
    assert not connection.exists(alive_key(prefix, WORKER))


def test_a_click_nobody_takes_gives_a_503_and_is_withdrawn(redis_prefix):
    connection, prefix = redis_prefix
    outcome = send_click(connection, prefix, WORKER, {"n": 1}, timeout=0.3)
    assert isinstance(outcome.value, ServiceError)
    assert (outcome.value.status, outcome.value.kind) == (503, "worker_timeout")
    assert "never will be" in outcome.value.message
    assert connection.llen(lane_key(prefix, WORKER)) == 0


def test_a_click_waiting_for_a_busy_model_past_the_time_limit_is_never_run(lane):
    connection, prefix, model, _ = lane
    with model.lock:  # a batch job holds the model
        outcome = send_click(connection, prefix, WORKER, {"n": 1}, timeout=0.5)
    assert isinstance(outcome.value, ServiceError) and outcome.value.status == 503
    assert send_click(connection, prefix, WORKER, {"n": 2}, timeout=5).result() == {"objects": [2]}
    assert model.ran == [{"n": 2}]


def test_a_click_started_before_the_limit_finishes_but_the_server_answers_503(lane):
    connection, prefix, model, _ = lane
    outcome = send_click(connection, prefix, WORKER, {"n": 1, "hold": True}, timeout=0.5)
    model.release.set()
    assert (outcome.value.status, outcome.value.kind) == (503, "worker_timeout")
    assert "started too late" in outcome.value.message


def test_stopping_waits_for_the_click_running(redis_prefix):
    connection, prefix = redis_prefix
    model = Model()
    served = ClickLane(connection, prefix, WORKER, model.run).start()
    outcomes = []
    sender = threading.Thread(
        target=lambda: outcomes.append(send_click(connection, prefix, WORKER, {"n": 1, "hold": True}, 10))
    )
    sender.start()
    assert model.started.wait(5)
    stopper = threading.Thread(target=served.stop, args=(10,))
    stopper.start()
    stopper.join(0.3)
    assert stopper.is_alive()  # still waiting for the click
    model.release.set()
    stopper.join(5)
    sender.join(5)
    assert outcomes[0].result() == {"objects": [1]}


def test_a_click_the_server_has_claimed_is_not_run_when_the_model_frees_up(redis_prefix):
    connection, prefix = redis_prefix
    model = Model()
    connection.set(claim_key(prefix, "given-up"), "server")
    ClickLane(connection, prefix, WORKER, model.run).serve_one(
        {"id": "given-up", "request": {"n": 1}, "timeout": 5}
    )
    assert model.ran == [] and not model.lock.locked()


def test_a_stopping_worker_answers_the_clicks_waiting_in_its_lane_at_once(redis_prefix):
    connection, prefix = redis_prefix
    outcomes = []
    sender = threading.Thread(
        target=lambda: outcomes.append(send_click(connection, prefix, WORKER, {"n": 1}, timeout=60))
    )
    sender.start()
    while not connection.llen(lane_key(prefix, WORKER)):
        threading.Event().wait(0.01)
    ClickLane(connection, prefix, WORKER, Model().run).stop(1)
    sender.join(10)
    [outcome] = outcomes
    assert (outcome.value.status, outcome.value.kind) == (503, "worker_stopping")


def test_a_reply_nobody_reads_expires(redis_prefix):
    connection, prefix = redis_prefix
    lane = ClickLane(connection, prefix, WORKER, Model().run)
    lane.serve_one({"id": "unread", "request": {}, "timeout": 5})
    [reply] = connection.lrange(reply_key(prefix, "unread"), 0, -1)
    assert json.loads(reply)["objects"] == [None]
    assert 0 < connection.ttl(reply_key(prefix, "unread")) <= 60
