"""What a job hands back crosses RQ as one envelope: a result, or the ServiceError that stopped the job, which
the server's caller gets raised again, with the job's timing either way."""

from __future__ import annotations

import importlib
import json

import pytest

from backend.errors import ServiceError
from backend.job_protocol import DETECT, PRIORITIES, SEGMENT, decode_job_result, encode_job_result


def _through_rq(envelope: dict) -> dict:
    """As RQ's JSON serializer stores and returns it."""
    return json.loads(json.dumps(envelope))


def test_a_result_crosses_with_its_timing():
    result = {"model_version": "v1", "width": 640, "height": 478, "objects": []}
    outcome = decode_job_result(_through_rq(encode_job_result(result, queued=0.25, running=1.5)))
    assert outcome.result() == result
    assert (outcome.queued, outcome.running) == (0.25, 1.5)


def test_a_service_error_crosses_and_is_raised_again():
    refused = ServiceError(400, "unsupported_url", "file:// URLs are not served")
    outcome = decode_job_result(_through_rq(encode_job_result(refused, queued=0.0, running=0.1)))
    with pytest.raises(ServiceError) as raised:
        outcome.result()
    assert (raised.value.status, raised.value.kind, raised.value.message) == (
        400,
        "unsupported_url",
        "file:// URLs are not served",
    )
    assert outcome.running == 0.1


@pytest.mark.parametrize("kind", [SEGMENT, DETECT], ids=lambda kind: kind.name)
def test_each_job_kind_names_a_queue_and_a_function_rq_can_import(kind):
    assert kind.queue in PRIORITIES
    module, name = kind.function.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), name))
