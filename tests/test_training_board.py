"""The training job board: per-project records, and running jobs whose process is gone read as interrupted."""

import os
import socket
import subprocess
import sys

from backend.training_board import JobBoard
from segmodels.model_store import ModelStore
from segmodels.predictor import DEFAULT_CHECKPOINT


def _board(tmp_path) -> JobBoard:
    return JobBoard(ModelStore(tmp_path / "store", DEFAULT_CHECKPOINT))


def _gone_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_records_merge_and_are_listed_by_project(tmp_path):
    board = _board(tmp_path)
    board.write(2, state="queued", trigger="test")
    board.write(2, state="published", percent=100)
    board.write(1, state="kept")
    assert [(r["project"], r["state"]) for r in board.all()] == [(1, "kept"), (2, "published")]
    assert board.read(2)["trigger"] == "test" and board.read(3) == {}


def test_a_running_job_whose_process_is_gone_reads_as_interrupted(tmp_path):
    board = _board(tmp_path)
    board.write(1, state="running", host=socket.gethostname(), pid=os.getpid())
    assert board.read(1)["state"] == "running"
    board.write(1, state="running", host=socket.gethostname(), pid=_gone_pid())
    assert board.read(1)["state"] == "interrupted"


def test_another_machines_running_job_is_trusted(tmp_path):
    board = _board(tmp_path)
    board.write(1, state="running", host=f"not-{socket.gethostname()}", pid=_gone_pid())
    assert board.read(1)["state"] == "running"


def test_a_store_without_a_root_keeps_no_records():
    board = JobBoard(ModelStore(None, DEFAULT_CHECKPOINT))
    assert board.write(1, state="queued") == {"state": "queued"} and board.all() == []
