"""The click lane (backend.click_lane): a click goes to the worker holding its image through two Redis lists,
comes back as the worker's result or its refusal, and is never run after the server has given up on it.
A real Redis; the worker's runtime is a plain function here (the full path runs in test_affinity's slow test).
"""

import json
import time
import uuid

import pytest
from rq_worker import require_redis

from backend.click_lane import ClickLane, lane_key, reply_key, send_click
from backend.errors import ServiceError

WORKER = "segmask-lane-test"


@pytest.fixture
def redis_prefix():
    connection = require_redis()
    prefix = f"segmask-lane-{uuid.uuid4().hex[:8]}"
    yield connection, prefix
    for key in connection.scan_iter(f"{prefix}:*"):
        connection.delete(key)


def serving(connection, prefix, run):
    return ClickLane(connection, prefix, WORKER, run).start()


def test_a_click_comes_back_with_the_workers_result_and_its_timing(redis_prefix):
    connection, prefix = redis_prefix
    lane = serving(connection, prefix, lambda request: {"objects": [request["n"]]})
    try:
        outcome = send_click(connection, prefix, WORKER, {"n": 7}, timeout=5)
    finally:
        lane.stop()
    assert outcome.result() == {"objects": [7]}
    assert outcome.queued >= 0 and outcome.running >= 0


def test_a_refusal_on_the_worker_comes_back_as_the_same_error(redis_prefix):
    connection, prefix = redis_prefix

    def refuse(request):
        raise ServiceError(422, "bad_prompt", "the point lies outside the image")

    lane = serving(connection, prefix, refuse)
    try:
        outcome = send_click(connection, prefix, WORKER, {}, timeout=5)
    finally:
        lane.stop()
    with pytest.raises(ServiceError) as refused:
        outcome.result()
    assert (refused.value.status, refused.value.kind) == (422, "bad_prompt")


def test_a_crash_gives_a_500_and_the_lane_serves_the_next_click(redis_prefix):
    connection, prefix = redis_prefix

    def crash_once(request):
        if request["n"] == 1:
            raise RuntimeError("boom")
        return {"objects": []}

    lane = serving(connection, prefix, crash_once)
    try:
        first = send_click(connection, prefix, WORKER, {"n": 1}, timeout=5)
        second = send_click(connection, prefix, WORKER, {"n": 2}, timeout=5)
    finally:
        lane.stop()
    assert isinstance(first.value, ServiceError) and first.value.status == 500
    assert "boom" in first.value.message
    assert second.result() == {"objects": []}


def test_a_click_nobody_takes_gives_a_503_and_is_withdrawn(redis_prefix):
    connection, prefix = redis_prefix
    outcome = send_click(connection, prefix, WORKER, {"n": 1}, timeout=0.3)
    assert isinstance(outcome.value, ServiceError)
    assert (outcome.value.status, outcome.value.kind) == (503, "worker_timeout")
    assert connection.llen(lane_key(prefix, WORKER)) == 0


def test_a_click_past_its_deadline_is_not_run(redis_prefix):
    connection, prefix = redis_prefix
    ran = []
    lane = ClickLane(connection, prefix, WORKER, ran.append)
    lane.serve_one({"id": "late", "request": {"n": 1}, "sent": time.time() - 10, "deadline": time.time() - 1})
    assert ran == [] and connection.llen(reply_key(prefix, "late")) == 0


def test_a_reply_nobody_reads_expires(redis_prefix):
    connection, prefix = redis_prefix
    lane = ClickLane(connection, prefix, WORKER, lambda request: {"objects": []})
    lane.serve_one({"id": "unread", "request": {}, "sent": time.time(), "deadline": time.time() + 5})
    [reply] = connection.lrange(reply_key(prefix, "unread"), 0, -1)
    assert json.loads(reply)["objects"] == []
    assert 0 < connection.ttl(reply_key(prefix, "unread")) <= 60
