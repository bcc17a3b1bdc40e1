"""The allocator re-exec: the environment it re-executes with, and when it does not."""

import os
import sys

import pytest

from backend import allocator
from backend.allocator import ALLOCATOR_ENV, REEXEC_MARK, ensure_allocator_env


class Exec(Exception):
    """Raised by the stand-in for ``os.execve`` with its arguments: what the process would have become."""


@pytest.fixture
def execs(monkeypatch: pytest.MonkeyPatch) -> None:
    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        raise Exec(path, argv, env)

    monkeypatch.setattr(allocator.os, "execve", execve)
    for key in (*ALLOCATOR_ENV, REEXEC_MARK):
        monkeypatch.delenv(key, raising=False)


def test_a_process_without_the_settings_re_executes_with_them_keeping_values_already_set(execs, monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    with pytest.raises(Exec) as done:
        ensure_allocator_env(["-m", "backend.cli", "serve"])
    path, argv, env = done.value.args
    assert path == sys.executable and argv == [sys.executable, "-m", "backend.cli", "serve"]
    assert env["MALLOC_ARENA_MAX"] == "4"
    assert env["MALLOC_MMAP_THRESHOLD_"] == ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert env[REEXEC_MARK] == str(os.getpid())


def test_by_default_the_process_re_executes_its_own_command_line(execs):
    with pytest.raises(Exec) as done:
        ensure_allocator_env()
    assert done.value.args[1] == [sys.executable, *sys.orig_argv[1:]]


def test_the_settings_can_be_removed_for_a_measurement_without_them(execs, monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    with pytest.raises(Exec) as done:
        ensure_allocator_env(["bench.py"], use=False)
    assert not any(key in done.value.args[2] for key in ALLOCATOR_ENV)
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert ensure_allocator_env(["bench.py"], use=False) is False


def test_a_process_already_so_runs_on_and_knows_whether_it_was_re_executed(execs, monkeypatch):
    for key, value in ALLOCATOR_ENV.items():
        monkeypatch.setenv(key, value)
    assert ensure_allocator_env() is False
    monkeypatch.setenv(REEXEC_MARK, str(os.getpid()))
    assert ensure_allocator_env() is True
    # A child process inherits the mark but not the process id: it was not re-executed.
    monkeypatch.setenv(REEXEC_MARK, str(os.getpid() + 1))
    assert ensure_allocator_env() is False


def test_a_re_executed_process_still_without_the_settings_stops_instead_of_looping(execs, monkeypatch):
    monkeypatch.setenv(REEXEC_MARK, str(os.getpid()))
    with pytest.raises(RuntimeError, match="still wrong"):
        ensure_allocator_env()
