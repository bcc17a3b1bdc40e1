"""Real Redis, `segmask worker` and `segmask serve` processes for the queued-path and end-to-end tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import redis

REDIS_URL = os.environ.get("SEGMASK_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def require_redis(url: str = REDIS_URL) -> redis.Redis:
    """A connection to the test Redis, or a skip saying how to provide one."""
    connection = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        connection.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {url} ({exc}); start one (redis-server) or set SEGMASK_TEST_REDIS_URL")
    return connection


def stored_under(connection: redis.Redis, prefix: str) -> dict[str, bytes]:
    """Everything Redis holds for the deployment ``prefix``, by key: the values of its keys, and the hashes of
    the jobs its queues and registries name (``rq:job:<id>``, the payload decompressed as RQ stores it
    zlib-compressed). Tests read it to show which secrets are stored where."""
    stored: dict[str, bytes] = {}
    job_ids: set[bytes] = set()
    for key in connection.scan_iter(f"*{prefix}*"):
        kind = connection.type(key)
        if kind == b"string":
            values = [connection.get(key)]
        elif kind == b"hash":
            values = [part for item in connection.hgetall(key).items() for part in item]
        elif kind == b"list":
            values = connection.lrange(key, 0, -1)
        elif kind == b"zset":
            values = connection.zrange(key, 0, -1)
        else:
            values = list(connection.smembers(key)) if kind == b"set" else []
        job_ids.update(v for v in values if kind in (b"list", b"zset"))
        stored[key.decode()] = b"\n".join(v for v in values if v is not None)
    for job_id in job_ids:
        fields = connection.hgetall(b"rq:job:" + job_id)
        parts = [zlib.decompress(v) if k == b"data" else v for k, v in fields.items()]
        stored[f"rq:job:{job_id.decode()}"] = b"\n".join(parts)
    return stored


def start_worker(
    redis_url: str, prefix: str, log_path: Path, queues: str = "interactive,batch,training", **env: str
) -> subprocess.Popen:
    """A `segmask worker` process on ``prefix``'s ``queues``; returns once it has registered with Redis."""
    cmd = [sys.executable, "-m", "backend.cli", "worker", "--queues", queues]
    environ = {**os.environ, "SEGMASK_REDIS_URL": redis_url, "SEGMASK_QUEUE_PREFIX": prefix, **env}
    log = log_path.open("ab")
    proc = subprocess.Popen(cmd, env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_worker(redis_url, prefix, proc, log_path)
    return proc


def wait_for_worker(
    redis_url: str, prefix: str, proc: subprocess.Popen, log_path: Path, timeout: float = 90
) -> None:
    from rq import Queue, Worker

    connection = redis.Redis.from_url(redis_url)
    queue = Queue(f"{prefix}:interactive", connection=connection)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"segmask worker exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            )
        try:
            if Worker.count(connection=connection, queue=queue):
                return
        except redis.RedisError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"segmask worker did not register within {timeout} s:\n{log_path.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis_server(port: int) -> subprocess.Popen:
    """A private, throw-away redis-server on ``port`` (for outage tests); skips if there is no binary."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed; the Redis outage test needs its own server")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    connection = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            connection.ping()
            return proc
        except redis.RedisError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not start on port {port}")


def start_server(
    env: dict[str, str], log_path: Path, auth: tuple[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """``segmask serve`` (gunicorn) on a free loopback port with ``env`` added; returns it and its URL once
    ``/health`` answers."""
    import requests

    port = free_port()
    environ = {**os.environ, **env, "SEGMASK_PORT": str(port), "SEGMASK_HOST": "127.0.0.1"}
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve"], env=environ, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", auth=auth, timeout=1).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.3)
    stop(proc)
    raise RuntimeError(f"segmask serve did not start:\n{log_path.read_text()[-3000:]}")
