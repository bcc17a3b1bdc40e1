"""How the backend authenticates to Label Studio: the value of the ``Authorization`` header.

Label Studio 1.23 accepts two kinds of API key (see ``docs/label-studio-protocol.md``):

* a **legacy token** (40 hex characters, a Django REST Framework token), sent as ``Token <key>``; it works
  only where the organisation enables legacy tokens. The ``access_token`` Label Studio sends in ``/setup`` is
  one;
* a **personal access token** (PAT, a JWT refresh token), which is exchanged at ``POST /api/token/refresh/``
  for a short-lived (5 minute) JWT access token, sent as ``Bearer <access>``.

:class:`LabelStudioCredentials` hides the difference: ``authorization()`` returns the header value, exchanging
and caching the access token as needed. Nothing here logs or puts a secret into an error message.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt

from backend.errors import ServiceError

logger = logging.getLogger(__name__)

#: A legacy Label Studio token: Django REST Framework's 40 hex characters.
LEGACY_TOKEN = re.compile(r"[0-9a-fA-F]{40}")
#: Refresh the cached access token when fewer than this many seconds of its life remain.
REFRESH_MARGIN_S = 30.0
#: Assumed lifetime of an access token that carries no ``exp`` claim (Label Studio's always carry one).
DEFAULT_ACCESS_TTL_S = 60.0


def is_personal_access_token(key: str) -> bool:
    """True when ``key`` has a JWT's shape (``header.payload.signature``), i.e. is a personal access token."""
    return key.count(".") == 2


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of ``token`` (Unix seconds), read WITHOUT verifying the signature; None if absent.

    We only use it to decide when to refresh; Label Studio verifies the token, not us.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) else None


class LabelStudioCredentials:
    """Credentials for one Label Studio instance.

    ``base_url`` is Label Studio's base URL (``http://host:port``), used only to exchange a personal access
    token; ``api_key`` is a personal access token, a legacy token, or empty. ``timeout`` bounds the token
    exchange (seconds); ``clock`` returns Unix time (tests pass a fake one). Thread-safe: concurrent callers
    share one cached access token and at most one exchange runs at a time.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key.strip()
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._client: Any = None  # label_studio_sdk.LabelStudio, made on the first exchange
        self._access: str | None = None
        self._access_expires_at = 0.0
        if self.kind == "token" and not LEGACY_TOKEN.fullmatch(self._api_key):
            logger.warning("Label Studio API key is neither a JWT nor 40 hex digits; used as a legacy token")

    @property
    def kind(self) -> str:
        """The configured key: ``"pat"`` (personal access token), ``"token"`` (legacy) or ``"none"``."""
        if not self._api_key:
            return "none"
        return "pat" if is_personal_access_token(self._api_key) else "token"

    def authorization(self) -> str | None:
        """The ``Authorization`` header value for a request to ``base_url``; None when there is no key.

        Which key may go to which Label Studio is decided by ``backend.access``, not here. A personal access
        token costs a round trip to Label Studio when the cached access token is missing or has fewer than
        ``REFRESH_MARGIN_S`` seconds left; that exchange failing raises ``ServiceError(502,
        "label_studio_auth")``.
        """
        if self.kind == "pat":
            return f"Bearer {self._access_token()}"
        if self.kind == "token":
            return f"Token {self._api_key}"
        return None

    def client(self) -> Any:
        """A label-studio-sdk client of ``base_url`` with this key, for reading the API (training,
        rescoring); the SDK exchanges a personal access token itself."""
        from label_studio_sdk.client import LabelStudio

        return LabelStudio(base_url=self.base_url, api_key=self._api_key)

    def _access_token(self) -> str:
        with self._lock:
            if self._access is None or self._access_expires_at - self._clock() < REFRESH_MARGIN_S:
                self._access = self._exchange()
                expiry = jwt_expiry(self._access)
                if expiry is None:
                    expiry = self._clock() + DEFAULT_ACCESS_TTL_S
                self._access_expires_at = expiry
                logger.info(
                    "Label Studio access token refreshed at %s (valid %.0f s)",
                    self.base_url,
                    self._access_expires_at - self._clock(),
                )
            return self._access

    def _exchange(self) -> str:
        """Exchange the personal access token for an access token (``POST <base_url>/api/token/refresh/``).

        The SDK client is kept between exchanges: it authenticates the exchange itself with an access token
        it caches on its own, so a warm client makes one request per exchange. The SDK (about 1 s to import)
        is imported here, so that processes with a legacy token never pay for it.
        """
        from label_studio_sdk import LabelStudio
        from label_studio_sdk.core.api_error import ApiError
        from label_studio_sdk.core.parse_error import ParsingError

        if not self.base_url:
            raise ServiceError(
                502,
                "label_studio_auth",
                "a personal access token is configured but no Label Studio URL is "
                "known to exchange it at (set LABEL_STUDIO_URL)",
            )
        try:
            if self._client is None:
                self._client = LabelStudio(
                    base_url=self.base_url, api_key=self._api_key, timeout=self._timeout, max_retries=0
                )
            answer = self._client.tokens.refresh(refresh=self._api_key, request_options={"max_retries": 0})
            return answer.access
        except ApiError as exc:
            detail = exc.body.get("detail", exc.body) if isinstance(exc.body, dict) else exc.body
            detail = str(detail)[:200]
            problem = f"HTTP {exc.status_code}: {detail}" if exc.status_code else detail
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        except (ParsingError, ValueError) as exc:  # a 2xx answer that is not the expected JSON
            problem = f"unexpected answer ({type(exc).__name__})"
        raise ServiceError(
            502,
            "label_studio_auth",
            f"cannot exchange the personal access token at {self.base_url}/api/token/refresh/: {problem}",
        )
