"""backend.credentials: legacy tokens and personal access tokens exchanged against a
real local HTTP server that implements Label Studio's ``POST /api/token/refresh/`` (the endpoint that
label-studio-sdk 2.1.2's ``tokens.refresh`` calls: body ``{"refresh": <PAT>}``, answer
``{"access": <JWT>}``)."""

from __future__ import annotations

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest

from backend.credentials import REFRESH_MARGIN_S, LabelStudioCredentials, jwt_expiry
from backend.errors import ServiceError

# label-studio-sdk 2.1.2 itself calls pydantic's deprecated parse_obj when it exchanges a token.
pytestmark = pytest.mark.filterwarnings("ignore:The `parse_obj` method is deprecated")

LEGACY = "0123456789abcdef0123456789abcdef01234567"
SIGNING_KEY = "label-studio-test-secret-key-of-32-bytes!"
ACCESS_TTL = 300


class FakeClock:
    """Unix time that tests move forward by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def make_pat(exp_in: float = 3600.0) -> str:
    claims = {"token_type": "refresh", "exp": int(time.time() + exp_in), "user_id": 1, "jti": "pat"}
    return jwt.encode(claims, SIGNING_KEY, algorithm="HS256")


class TokenServer(ThreadingHTTPServer):
    """Label Studio's token refresh endpoint; ``fail`` makes it answer 401 like Label Studio does."""

    daemon_threads = True

    def __init__(self, pat: str, clock: FakeClock) -> None:
        super().__init__(("127.0.0.1", 0), TokenHandler)
        self.pat = pat
        self.clock = clock
        self.fail = False
        self.issued: list[str] = []
        self.bodies: list[dict] = []
        self._ids = itertools.count()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def issue(self) -> str:
        claims = {"token_type": "access", "exp": int(self.clock() + ACCESS_TTL), "jti": f"a{next(self._ids)}"}
        token = jwt.encode(claims, SIGNING_KEY, algorithm="HS256")
        self.issued.append(token)
        return token


class TokenHandler(BaseHTTPRequestHandler):
    server: TokenServer

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.server.bodies.append(body)
        if self.path != "/api/token/refresh/":
            return self._answer(404, {"detail": "Not found."})
        if self.server.fail or body.get("refresh") != self.server.pat:
            return self._answer(401, {"detail": "Token is invalid or expired", "code": "token_not_valid"})
        self._answer(200, {"access": self.server.issue()})

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pat() -> str:
    return make_pat()


@pytest.fixture
def token_server(pat: str, clock: FakeClock):
    server = TokenServer(pat, clock)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_legacy_token_is_sent_as_token() -> None:
    creds = LabelStudioCredentials("http://ls.invalid:8080", LEGACY)
    assert creds.kind == "token"
    assert creds.authorization() == f"Token {LEGACY}"


def test_no_key_gives_none() -> None:
    creds = LabelStudioCredentials("http://ls.invalid:8080", "")
    assert creds.kind == "none" and creds.authorization() is None


def test_jwt_expiry_reads_exp_without_the_signing_key() -> None:
    token = jwt.encode({"exp": 1_900_000_000}, "some-other-secret-key-of-32-bytes!!", algorithm="HS256")
    assert jwt_expiry(token) == 1_900_000_000
    assert jwt_expiry("not.a.jwt") is None


def test_pat_is_exchanged_for_a_bearer_access_token(token_server: TokenServer, pat: str, clock) -> None:
    creds = LabelStudioCredentials(token_server.url, pat, clock=clock)
    assert creds.kind == "pat"
    header = creds.authorization()
    assert header == f"Bearer {token_server.issued[-1]}"
    assert {"refresh": pat} in token_server.bodies


def test_access_token_is_reused_while_valid(token_server: TokenServer, pat: str, clock) -> None:
    creds = LabelStudioCredentials(token_server.url, pat, clock=clock)
    first = creds.authorization()
    requests_after_first = len(token_server.bodies)
    clock.now += ACCESS_TTL - REFRESH_MARGIN_S - 5  # 35 s left: still valid
    assert creds.authorization() == first
    assert len(token_server.bodies) == requests_after_first


def test_access_token_is_refreshed_near_expiry(token_server: TokenServer, pat: str, clock) -> None:
    creds = LabelStudioCredentials(token_server.url, pat, clock=clock)
    first = creds.authorization()
    clock.now += ACCESS_TTL - REFRESH_MARGIN_S + 5  # 25 s left: refresh
    second = creds.authorization()
    assert second != first
    assert second == f"Bearer {token_server.issued[-1]}"


def test_concurrent_callers_share_one_exchange(token_server: TokenServer, pat: str, clock) -> None:
    creds = LabelStudioCredentials(token_server.url, pat, clock=clock)
    results: list[str | None] = []
    threads = [threading.Thread(target=lambda: results.append(creds.authorization())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len(set(results)) == 1  # each exchange mints a distinct token


def test_refresh_rejected_by_label_studio_is_502(token_server: TokenServer, pat: str, clock) -> None:
    token_server.fail = True
    creds = LabelStudioCredentials(token_server.url, pat, clock=clock)
    with pytest.raises(ServiceError) as info:
        creds.authorization()
    assert (info.value.status, info.value.kind) == (502, "label_studio_auth")
    assert token_server.url in info.value.message and "401" in info.value.message
    assert pat not in info.value.message


def test_unreachable_label_studio_is_502(pat: str, clock) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    server.server_close()  # nothing listens there now
    with pytest.raises(ServiceError) as info:
        LabelStudioCredentials(url, pat, timeout=2.0, clock=clock).authorization()
    assert (info.value.status, info.value.kind) == (502, "label_studio_auth")
    assert url in info.value.message


def test_expired_pat_is_502_naming_the_problem(token_server: TokenServer, clock) -> None:
    creds = LabelStudioCredentials(token_server.url, make_pat(exp_in=-60), clock=clock)
    with pytest.raises(ServiceError) as info:
        creds.authorization()
    assert (info.value.status, info.value.kind) == (502, "label_studio_auth")
    assert "expired" in info.value.message


def test_pat_without_label_studio_url_is_502(pat: str) -> None:
    with pytest.raises(ServiceError) as info:
        LabelStudioCredentials("", pat).authorization()
    assert (info.value.status, info.value.kind) == (502, "label_studio_auth")
