"""Time limits against hostile or busy peers: SEGMASK_IMAGE_TIMEOUT bounds a whole image download however
slowly a local server drips bytes (TLS handshake, headers, body, redirects, kept-alive connections), and the
embedded dispatcher honours its request timeout while the model is busy (503 ``worker_timeout``)."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from backend.embedded_dispatcher import EmbeddedDispatcher
from backend.errors import ServiceError
from backend.images import ImageFetcher
from backend.job_protocol import DETECT, SEGMENT, JobKind, JobOutcome
from backend.model_lock import ModelLock, ModelWait, waiting_until, yielding
from backend.settings import Settings

#: Seconds between the bytes of a drip: each read returns long before any socket timeout.
DRIP_PAUSE = 0.2
#: The image timeout of these tests, and a bound well above it that a cut-off download must stay under
#: (a correctness check, not a benchmark: each drip below would take 20 s or more to finish).
LIMIT = 1.0
BOUND = 5.0

# ---------------------------------------------------------------------------------------------- drip server

Respond = Callable[[socket.socket], None]


class _Handler(socketserver.BaseRequestHandler):
    server: _DripServer

    def handle(self) -> None:
        with self.server.lock:
            self.server.connections += 1
        with contextlib.suppress(OSError):  # the client hung up: what these servers are waiting for
            self.server.respond(self.request)


class _DripServer(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, respond: Respond) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.respond = respond
        self.connections = 0
        self.lock = threading.Lock()


@contextlib.contextmanager
def serving(respond: Respond) -> Iterator[_DripServer]:
    """A local TCP server answering each connection with ``respond(connection)``."""
    server = _DripServer(respond)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def port(server: _DripServer) -> int:
    return server.server_address[1]


def read_request(connection: socket.socket) -> str:
    """The path of the next HTTP request on ``connection`` (its headers read and dropped)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(4096)
        if not chunk:
            raise ConnectionError("the client closed the connection")
        data += chunk
    return data.split(b" ", 2)[1].decode()


def drip(connection: socket.socket, data: bytes, pause: float = DRIP_PAUSE) -> None:
    """Send ``data`` one byte every ``pause`` s."""
    for byte in data:
        connection.sendall(bytes([byte]))
        time.sleep(pause)


def fetch_within_limit(url: str) -> tuple[ServiceError, float]:
    """The error a fetch of ``url`` ends with (image_timeout=LIMIT), and the seconds it took."""
    fetcher = ImageFetcher(Settings(allowed_hosts=("127.0.0.1",), image_timeout=LIMIT))
    started = time.monotonic()
    with pytest.raises(ServiceError) as info:
        fetcher.fetch(url)
    return info.value, time.monotonic() - started


def assert_timed_out(error: ServiceError, seconds: float) -> None:
    assert (error.status, error.kind) == (422, "image_unreachable"), error.message
    assert f"SEGMASK_IMAGE_TIMEOUT ({LIMIT:g} s)" in error.message
    assert LIMIT * 0.9 <= seconds < BOUND


# ---------------------------------------------------------------------------------------------- downloads


def test_a_body_dripping_under_its_content_length_is_cut_off_at_the_image_timeout() -> None:
    def respond(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        drip(connection, b"x" * 100)

    with serving(respond) as server:
        error, seconds = fetch_within_limit(f"http://user:pw@127.0.0.1:{port(server)}/a.jpg?sig=secret")
    assert_timed_out(error, seconds)
    assert f"http://127.0.0.1:{port(server)}/a.jpg?..." in error.message
    assert "secret" not in error.message and "pw" not in error.message


def test_a_dripping_body_without_content_length_is_a_timeout_not_a_short_image() -> None:
    def respond(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
        drip(connection, b"x" * 100)

    with serving(respond) as server:
        error, seconds = fetch_within_limit(f"http://127.0.0.1:{port(server)}/a.jpg")
    assert_timed_out(error, seconds)


def test_dripping_headers_are_cut_off_at_the_image_timeout() -> None:
    def respond(connection: socket.socket) -> None:
        read_request(connection)
        drip(connection, b"HTTP/1.1 200 OK\r\nX-Padding: " + b"p" * 100 + b"\r\n\r\n")

    with serving(respond) as server:
        error, seconds = fetch_within_limit(f"http://127.0.0.1:{port(server)}/a.jpg")
    assert_timed_out(error, seconds)


def test_a_dripping_tls_handshake_is_cut_off_at_the_image_timeout() -> None:
    def respond(connection: socket.socket) -> None:
        connection.recv(4096)  # the ClientHello
        connection.sendall(b"\x16\x03\x03\x40\x00")  # a handshake record of 16 KiB ...
        drip(connection, bytes(100))  # ... that never completes

    with serving(respond) as server:
        error, seconds = fetch_within_limit(f"https://127.0.0.1:{port(server)}/a.jpg")
    assert_timed_out(error, seconds)


def test_a_redirect_chain_shares_one_deadline() -> None:
    """Each hop answers in 0.6 s, within the limit; the chain of four would take 2.4 s."""

    def respond(connection: socket.socket) -> None:
        hops = int(read_request(connection).rsplit("/", 1)[-1])
        if not hops:
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return
        redirect = f"HTTP/1.1 302 Found\r\nLocation: /hop/{hops - 1}\r\nConnection: close\r\n\r\n"
        drip(connection, redirect.encode(), pause=0.6 / len(redirect))

    with serving(respond) as server:
        error, seconds = fetch_within_limit(f"http://127.0.0.1:{port(server)}/hop/3")
        assert server.connections <= 2
    assert_timed_out(error, seconds)
    assert "/hop/" in error.message


def test_a_kept_alive_connection_is_bounded_when_reused() -> None:
    """The second download reuses the first one's connection (no new socket); its headers drip."""

    def respond(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        read_request(connection)
        drip(connection, b"HTTP/1.1 200 OK\r\nX-Padding: " + b"p" * 100 + b"\r\n\r\n")

    with serving(respond) as server:
        fetcher = ImageFetcher(Settings(allowed_hosts=("127.0.0.1",), image_timeout=LIMIT))
        assert fetcher.fetch(f"http://127.0.0.1:{port(server)}/first.jpg") == b"ok"
        time.sleep(LIMIT * 1.2)  # past the first download's deadline: its timer must not touch the connection
        started = time.monotonic()
        with pytest.raises(ServiceError) as info:
            fetcher.fetch(f"http://127.0.0.1:{port(server)}/second.jpg")
        assert server.connections == 1
    assert_timed_out(info.value, time.monotonic() - started)


def test_a_download_within_the_limit_is_unaffected() -> None:
    def respond(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        drip(connection, b"image", pause=0.05)

    with serving(respond) as server:
        fetcher = ImageFetcher(Settings(allowed_hosts=("127.0.0.1",), image_timeout=LIMIT))
        assert fetcher.fetch(f"http://127.0.0.1:{port(server)}/a.jpg") == b"image"


# ---------------------------------------------------------------------------------------------- embedded mode


def test_a_request_refused_once_it_holds_the_model_releases_it():
    lock, calls = ModelLock(), []

    def refuse() -> None:
        calls.append(1)
        raise ServiceError(503, "worker_timeout", "the server gave up")

    with waiting_until(ModelWait(time.monotonic() + 1, 1, admit=refuse)), pytest.raises(ServiceError), lock:
        pytest.fail("the request used the model")
    assert calls == [1] and not lock.locked()


class FakeRuntime:
    """Stands in for ``backend.runtime.Runtime``: ``prepare`` s outside the model lock (an image download),
    ``model`` s inside it; counts the model calls."""

    def __init__(self, prepare: float = 0.0, model: float = 0.0) -> None:
        self.prepare = prepare
        self.model = model
        self.lock = ModelLock()  # as Runtime's
        self.model_calls = 0
        self.ran: list[str] = []  # the kinds, in the order they got the model

    def run(self, kind: JobKind, request: dict) -> dict:
        time.sleep(self.prepare)
        with self.lock:
            self.model_calls += 1
            self.ran.append(kind.name)
            time.sleep(self.model)
        return {"objects": [], "request": request}


def refusal(outcome: JobOutcome) -> ServiceError | None:
    """The ServiceError that stopped the job of ``outcome`` (None if it finished)."""
    try:
        outcome.result()
    except ServiceError as exc:
        return exc
    return None


@contextlib.contextmanager
def model_busy(runtime: FakeRuntime) -> Iterator[threading.Event]:
    """Another thread (no deadline of its own) holds the model until the yielded event is set."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with runtime.lock:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    held.wait(5)
    try:
        yield release
    finally:
        release.set()
        thread.join(5)


def test_a_request_waiting_for_a_busy_model_past_its_timeout_gets_503() -> None:
    runtime = FakeRuntime()
    dispatcher = EmbeddedDispatcher(runtime)
    with model_busy(runtime):
        started = time.monotonic()
        [outcome] = dispatcher.run(SEGMENT, [{"n": 0}], timeout=0.5)
        seconds = time.monotonic() - started
    error = refusal(outcome)
    assert isinstance(error, ServiceError)
    assert (error.status, error.kind) == (503, "worker_timeout")
    assert "waited 0.5 s" in error.message and "(0.5 s)" in error.message
    assert 0.45 <= seconds < BOUND
    assert runtime.model_calls == 0 and not runtime.lock.locked()


def test_a_batch_past_its_deadline_answers_the_rest_503_without_running_them() -> None:
    runtime = FakeRuntime(model=0.2)
    started = time.monotonic()
    outcomes = EmbeddedDispatcher(runtime).run(DETECT, [{"n": n} for n in range(50)], timeout=0.5)
    seconds = time.monotonic() - started
    done = [o for o in outcomes if refusal(o) is None]
    refused = [refusal(o) for o in outcomes if refusal(o) is not None]
    assert 1 <= len(done) <= 4 and len(done) + len(refused) == 50
    assert outcomes[: len(done)] == done  # tasks run in order, until the deadline
    assert runtime.model_calls == len(done)
    assert {(e.status, e.kind) for e in refused} == {(503, "worker_timeout")}
    assert "not started" in refused[0].message and "(0.5 s)" in refused[0].message
    assert seconds < BOUND


def test_a_batch_waiting_for_the_model_stops_at_its_deadline() -> None:
    runtime = FakeRuntime()
    dispatcher = EmbeddedDispatcher(runtime)
    with model_busy(runtime):
        outcomes = dispatcher.run(DETECT, [{"n": n} for n in range(1000)], timeout=0.5)
    assert "waited 0.5 s" in refusal(outcomes[0]).message
    assert all((error := refusal(o)) is not None and error.status == 503 for o in outcomes)
    assert runtime.model_calls == 0


def test_embedded_pre_annotation_lets_a_click_that_came_later_go_first() -> None:
    runtime = FakeRuntime(model=0.05)
    dispatcher = EmbeddedDispatcher(runtime)
    with model_busy(runtime):
        batch = threading.Thread(target=dispatcher.run, args=(DETECT, [{"n": 0}, {"n": 1}], 30))
        batch.start()
        _wait_for(lambda: runtime.lock.waiting == 1, "the batch did not wait for the model")
        click = threading.Thread(target=dispatcher.run, args=(SEGMENT, [{"n": 2}], 30))
        click.start()
        _wait_for(lambda: runtime.lock.waiting == 2, "the click did not wait for the model")
    batch.join(5)
    click.join(5)
    assert runtime.ran == ["segment", "detect", "detect"]


def test_queued_is_the_wait_for_the_model_and_running_the_rest() -> None:
    runtime = FakeRuntime(prepare=0.1, model=0.1)
    dispatcher = EmbeddedDispatcher(runtime)
    with model_busy(runtime) as release:
        threading.Timer(0.4, release.set).start()
        [outcome] = dispatcher.run(SEGMENT, [{"n": 0}], timeout=5)
    assert refusal(outcome) is None
    assert 0.2 <= outcome.queued < 1.0  # 0.4 s busy, less the 0.1 s prepared meanwhile
    assert 0.15 <= outcome.running < 0.6  # prepare + model


def test_work_outside_the_model_lock_is_not_serialised() -> None:
    runtime = FakeRuntime(prepare=0.5, model=0.01)
    dispatcher = EmbeddedDispatcher(runtime)
    outcomes: list[JobOutcome] = []
    threads = [
        threading.Thread(target=lambda: outcomes.extend(dispatcher.run(SEGMENT, [{}], timeout=5)))
        for _ in range(4)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(outcomes) == 4 and all(refusal(o) is None for o in outcomes)
    assert time.monotonic() - started < 1.5  # four 0.5 s downloads side by side, not one after another


def test_background_work_yields_to_clicks_and_queues_with_pre_annotation() -> None:
    lock, order = ModelLock(), []

    def background() -> None:
        with lock.background():
            order.append("background")

    far = time.monotonic() + 30
    with lock:
        worker = threading.Thread(target=background)
        worker.start()
        _wait_for(lambda: lock.waiting == 1, "the background work did not wait for the model")
        waits = {"pre-annotation": ModelWait(far, 30, yields=True), "click": ModelWait(far, 30)}
        threads = _queue_behind(lock, waits, order)
    for thread in [worker, *threads]:
        thread.join(5)
    assert order == ["click", "background", "pre-annotation"]


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _queue_behind(lock: ModelLock, waits: dict[str, ModelWait], order: list[str]) -> list[threading.Thread]:
    """One thread per named wait, started in that order while the caller holds ``lock``, each appending
    its name to ``order`` once it gets the model (or its name and status when it gives up)."""

    def take(name: str) -> None:
        try:
            with waiting_until(waits[name]), lock:
                order.append(name)
        except ServiceError as exc:
            order.append(f"{name}: {exc.status}")

    threads, before = [], lock.waiting
    for n, name in enumerate(waits):
        threads.append(threading.Thread(target=take, args=(name,)))
        threads[-1].start()
        _wait_for(lambda n=n: lock.waiting == before + n + 1, f"{name} was not counted as waiting")
    return threads


def test_a_waiting_click_gets_the_model_before_pre_annotation_that_waited_longer() -> None:
    lock, order = ModelLock(), []
    far = time.monotonic() + 30
    with lock:
        threads = _queue_behind(
            lock, {"pre-annotation": ModelWait(far, 30, yields=True), "click": ModelWait(far, 30)}, order
        )
    for thread in threads:
        thread.join(5)
    assert order == ["click", "pre-annotation"]


def test_waiting_clicks_get_the_model_in_the_order_they_came() -> None:
    lock, order = ModelLock(), []
    far = time.monotonic() + 30
    with lock:
        threads = _queue_behind(lock, {f"click {n}": ModelWait(far, 30) for n in range(5)}, order)
    for thread in threads:
        thread.join(5)
    assert order == [f"click {n}" for n in range(5)]


def test_rescoring_yields_to_requests_and_waits_without_a_deadline() -> None:
    lock, order = ModelLock(), []
    with lock:
        threads = _queue_behind(
            lock, {"rescore": yielding(), "click": ModelWait(time.monotonic() + 30, 30)}, order
        )
    for thread in threads:
        thread.join(5)
    assert order == ["click", "rescore"]


def test_pre_annotation_takes_a_free_model_at_once() -> None:
    lock = ModelLock()
    wait = ModelWait(time.monotonic(), 1.0, yields=True)  # no time left to wait: only a free model
    with waiting_until(wait), lock:
        assert lock.locked()


def test_pre_annotation_behind_a_click_that_gave_up_gets_the_model() -> None:
    lock, order = ModelLock(), []
    with lock:
        click, annotation = _queue_behind(
            lock,
            {
                "click": ModelWait(time.monotonic() + 0.5, 0.5),
                "pre-annotation": ModelWait(time.monotonic() + 30, 30, yields=True),
            },
            order,
        )
        click.join(5)  # it gave up while the model was still held
    annotation.join(5)
    assert order == ["click: 503", "pre-annotation"]


def test_a_workers_pre_annotation_job_yields_the_model_to_a_click_on_its_lane(monkeypatch) -> None:
    import backend.jobs as jobs

    order: list[str] = []

    class Runtime:  # a worker's runtime: the click lane's thread and the RQ job share its model lock
        settings = Settings.from_env({}, affinity_ttl=0)
        lock = ModelLock()

        def run(self, kind: JobKind, request: dict) -> dict:
            with self.lock:
                order.append(kind.name)
            return {"objects": [], "model_version": "v"}

    runtime = Runtime()
    monkeypatch.setattr(jobs, "_runtime", runtime)
    with runtime.lock:
        job = threading.Thread(target=jobs.detect_job, args=({"image": {"url": "/x.jpg"}},))
        job.start()
        _wait_for(lambda: runtime.lock.waiting == 1, "the job did not wait for the model")
        threads = _queue_behind(runtime.lock, {"click": ModelWait(time.monotonic() + 30, 30)}, order)
    for thread in [job, *threads]:
        thread.join(5)
    assert order == ["click", "detect"]


# ---------------------------------------------------------------------------------------------- model slots


def _holder(lock: ModelLock, key: str, order: list[str], release: threading.Event) -> threading.Thread:
    """A started thread that holds a place of ``lock`` for image ``key`` (appending ``key`` to ``order``
    once it has it) until ``release`` is set."""

    def hold() -> None:
        with lock.hold(key):
            order.append(key)
            release.wait(10)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return thread


def test_a_lock_of_two_slots_runs_two_images_at_once_and_queues_the_third() -> None:
    lock, order, release = ModelLock(slots=2), [], threading.Event()
    threads = [_holder(lock, "a", order, release), _holder(lock, "b", order, release)]
    _wait_for(lambda: len(order) == 2, "two images did not hold the model at once")
    threads.append(_holder(lock, "c", order, release))
    _wait_for(lambda: lock.waiting == 1, "the third image did not wait")
    assert sorted(order) == ["a", "b"]
    release.set()
    for thread in threads:
        thread.join(5)
    assert order[2] == "c" and not lock.locked()


def _second_request_on_image_a(lock: ModelLock, order: list[str], release: threading.Event) -> list:
    """Two started holders of image ``a``: the first holds the model, the second waits for it."""
    first = _holder(lock, "a", order, release)
    _wait_for(lambda: order == ["a"], "the first request did not get the model")
    second = _holder(lock, "a", order, release)
    _wait_for(lambda: lock.waiting == 1, "the second request on the image did not wait")
    return [first, second]


def test_two_requests_on_one_image_never_hold_the_model_at_once() -> None:
    """An image's features change as a request runs, so a second request on it waits, a free place or not."""
    lock, order, release = ModelLock(slots=2), [], threading.Event()
    threads = _second_request_on_image_a(lock, order, release)
    assert order == ["a"]
    release.set()
    for thread in threads:
        thread.join(5)
    assert order == ["a", "a"] and not lock.locked()


def test_a_request_waiting_for_its_image_does_not_hold_up_another_image() -> None:
    lock, order, release = ModelLock(slots=2), [], threading.Event()
    threads = _second_request_on_image_a(lock, order, release)
    threads.append(_holder(lock, "b", order, release))  # came later, on a free image: served first
    _wait_for(lambda: order == ["a", "b"], "the other image waited behind the busy one")
    release.set()
    for thread in threads:
        thread.join(5)
    assert order == ["a", "b", "a"]
