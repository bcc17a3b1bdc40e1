"""Safe access to the images Label Studio tasks point at.

A task's ``data.image`` is one of (see ``docs/label-studio-protocol.md``, "Images and credentials"):

* a path on Label Studio itself: ``/data/upload/<project>/<file>`` for uploads (also
  ``/storage-data/uploaded/...``, ``/tasks/<id>/presign/?fileuri=...``): any root-relative path is resolved
  against Label Studio's URL and fetched with its ``Authorization`` header;
* ``/data/local-files/?d=<path>`` for Label Studio's local storage: read from ``SEGMASK_LOCAL_FILES_ROOT``
  when that is set (never outside it), else fetched from Label Studio like an upload;
* an ``http(s)://`` URL as imported, fetched directly. Label Studio's token goes only to Label Studio's own
  origin (scheme, host and port), never to a third party.

Task data comes from whoever can create tasks, so fetching is defensive: only http and https, no private
addresses (SSRF) other than Label Studio's origin (scheme, host and port: not the other ports of its host) and
``SEGMASK_ALLOWED_HOSTS``, redirects followed by hand (at
most ``MAX_REDIRECTS``, each target checked again), a byte limit enforced while streaming, one time limit
(``SEGMASK_IMAGE_TIMEOUT``) on the whole download however slowly a server sends, a pixel limit checked before
any pixel is decoded, and only the formats browsers show (plus TIFF) are decoded. Every refusal
is a :class:`~backend.errors.ServiceError`. The address check runs twice: on the resolved host before a
request (a clear error, also for names that do not resolve), and on the address each connection actually
reached (``backend.peer_check``), so a DNS server answering differently the second time (rebinding) gains
nothing. ``HTTP(S)_PROXY`` and ``~/.netrc`` are ignored (``trust_env=False``), so no proxy sees the requests
and no stored password is sent anywhere.

Images come out as ``np.ndarray`` of shape ``(H, W, 3)``, ``uint8``, RGB, upright: EXIF orientation is
applied, as browsers do, so that ``W x H`` is the ``original_width x original_height`` Label Studio reports
and its percent coordinates map to pixels as ``x_px = x / 100 * W``, ``y_px = y / 100 * H`` (origin top-left,
x to the right, y down).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.cookiejar
import io
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, parse_qs, urljoin, urlsplit, urlunsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import ServiceError, bad_request
from backend.peer_check import (
    PeerCheckingAdapter,
    _CheckedHTTPConnection,
    _CheckedHTTPConnectionPool,
    _CheckedHTTPSConnection,
    _CheckedHTTPSConnectionPool,
    peer_check,
)

if TYPE_CHECKING:  # backend.settings imports torch (via segmodels); this module does not need it
    from backend.settings import Settings

logger = logging.getLogger(__name__)

#: Redirects followed per fetch; each target passes the same checks as the first URL.
MAX_REDIRECTS = 3
#: Bytes read per streaming step.
CHUNK_BYTES = 64 * 1024
LOCAL_FILES_PATH = "/data/local-files"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Pillow formats decoded: what browsers (so Label Studio's editor) display, plus TIFF. Others (EPS, which
#: runs Ghostscript, PSD, FITS, ...) are "not an image" here.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "AVIF", "ICO", "TIFF")


def describe_url(url: str) -> str:
    """``url`` without user info, query or fragment, for messages and logs (presigned URLs hold secrets)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return repr(url[:80])
    suffix = "?..." if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) + suffix


def split_url(url: str) -> SplitResult:
    """``urlsplit(url)``, with a malformed host or port a 400 ``unsupported_url``."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError as exc:
        raise bad_request(f"image URL {url[:80]!r} is malformed: {exc}", kind="unsupported_url") from None
    return parts


def origin(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an http(s) URL, with the default port filled in; None for anything else."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def credential_kind(authorization: str | None) -> str:
    """``"token"``, ``"bearer"``, ... (the scheme word of an ``Authorization`` value) or ``"none"``; never the
    secret itself."""
    if not authorization:
        return "none"
    return authorization.split(" ", 1)[0].lower()


def private_address(host: str, address: str, how: str) -> ServiceError:
    """403 ``private_address``: ``host`` ``how`` (resolves to, connected to) the non-public ``address``."""
    return ServiceError(
        403,
        "private_address",
        f"image host {host!r} {how} the non-public address {address}; only Label Studio's own origin and "
        "SEGMASK_ALLOWED_HOSTS may be private",
    )


def is_public_address(address: str) -> bool:
    """False for private, loopback, link-local, multicast, reserved and unspecified addresses (IPv4-mapped
    IPv6 addresses are judged as the IPv4 address they carry)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def content_key(data: bytes) -> str:
    """The cache key of an image file: the sha1 hex digest of its bytes, so the same picture under two URLs
    shares one key and per-image features can be cached by it."""
    return hashlib.sha1(data).hexdigest()


@dataclass(frozen=True)
class _Target:
    """One fetch's Label Studio: its base URL (``""`` if unknown) and the Authorization value for it."""

    label_studio_url: str
    authorization: str | None

    @property
    def origin(self) -> tuple[str, str, int] | None:
        return origin(self.label_studio_url) if self.label_studio_url else None


class ByteCache:
    """A thread-safe LRU of ``key -> bytes`` whose values total at most ``max_bytes``.

    ``hits`` and ``misses`` count :meth:`get` results (read by ``/metrics``).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    @property
    def total_bytes(self) -> int:
        """Bytes held now (<= ``max_bytes``)."""
        return self._total

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: str, data: bytes) -> None:
        """Keep ``data``, evicting least recently used entries; a value larger than the cache is not kept."""
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._total -= len(old)
            self._items[key] = data
            self._total += len(data)
            while self._total > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._total -= len(evicted)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._total = 0


class _Deadline:
    """One download's time limit, from the first connection to the last body byte, redirects included.

    Socket timeouts bound each read, not their sum: a server sending a byte a second, in the TLS handshake,
    the headers or the body, never lets one time out. So every socket the download uses is registered here
    (by :class:`_DeadlineAdapter`'s connections) and a timer shuts them down at the deadline, which ends the
    read under way at once. Registered sockets are duplicates (``fromfd``): the TLS wrapper detaches the
    socket it wraps, and closing a duplicate leaves a kept-alive connection open.
    """

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self._fired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._token = _current_deadline.set(self)
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        _current_deadline.reset(self._token)
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    @property
    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self.at - time.monotonic()

    @property
    def passed(self) -> bool:
        return self._fired or self.remaining <= 0

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down at the deadline (at once if it has passed)."""
        if sock.fileno() < 0:
            return
        copy = socket.fromfd(sock.fileno(), sock.family, sock.type)
        with self._lock:
            self._sockets.append(copy)
            if self._fired:
                _shut_down(copy)

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            for sock in self._sockets:
                _shut_down(sock)


_current_deadline: ContextVar[_Deadline | None] = ContextVar("segmask_image_deadline", default=None)


def _shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # the peer may have gone already
        sock.shutdown(socket.SHUT_RDWR)


def _watched(sock: socket.socket) -> socket.socket:
    """``sock``, registered with the download under way in this thread (if any)."""
    deadline = _current_deadline.get()
    if deadline is not None:
        deadline.watch(sock)
    return sock


class _WatchedConnection:
    """Mixin for urllib3 connections: each socket a request uses goes to the current :class:`_Deadline`, a
    new one as soon as it is connected (before any TLS handshake), a kept-alive one when it is reused."""

    sock: socket.socket | None

    def _new_conn(self) -> socket.socket:
        return _watched(super()._new_conn())

    def request(self, *args: Any, **kwargs: Any) -> None:
        if self.sock is not None:
            _watched(self.sock)
        super().request(*args, **kwargs)


class _WatchedHTTPConnection(_WatchedConnection, _CheckedHTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnection, _CheckedHTTPSConnection):
    pass


class _WatchedHTTPConnectionPool(_CheckedHTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSConnectionPool(_CheckedHTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _DeadlineAdapter(PeerCheckingAdapter):
    """A :class:`PeerCheckingAdapter` whose connections also register their sockets with the current
    :class:`_Deadline`."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _WatchedHTTPConnectionPool,
            "https": _WatchedHTTPSConnectionPool,
        }


class ImageFetcher:
    """Fetches and decodes task images under the limits in ``settings``.

    ``settings`` fields used: ``label_studio_url``, ``max_image_bytes``, ``max_image_pixels``,
    ``image_timeout``, ``image_cache_mb``, ``local_files_root``, ``allowed_hosts``.

    Thread-safe: one fetcher serves all request threads. Downloaded bytes are cached (LRU, ``image_cache_mb``)
    by absolute URL; ``hits``/``misses`` count cache lookups. Local files are read from disk each time (cheap,
    and they may change).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = ByteCache(settings.image_cache_mb * 1024 * 1024)
        self._allowed_hosts = frozenset(h.strip().lower() for h in settings.allowed_hosts if h.strip())
        self._local = threading.local()
        pillow_limit = Image.MAX_IMAGE_PIXELS
        if pillow_limit is not None and settings.max_image_pixels > 2 * pillow_limit:
            logger.warning(
                "SEGMASK_MAX_IMAGE_PIXELS=%d exceeds Pillow's own decompression-bomb limit (%d); images "
                "above that are refused too",
                settings.max_image_pixels,
                2 * pillow_limit,
            )

    @property
    def hits(self) -> int:
        """Fetches answered from the byte cache."""
        return self.cache.hits

    @property
    def misses(self) -> int:
        """Fetches of http(s) URLs not in the byte cache, so downloaded (local files are not counted)."""
        return self.cache.misses

    # ------------------------------------------------------------------ public API

    def fetch(self, url: str, label_studio_url: str | None = None, authorization: str | None = None) -> bytes:
        """The bytes of the image a task's ``url`` refers to (see the module docstring for what is accepted).

        ``label_studio_url`` (else ``settings.label_studio_url``) is Label Studio's base URL, which relative
        URLs are resolved against and which alone receives ``authorization``.
        Raises ServiceError: 400 ``unsupported_url``/``bad_request``/``no_label_studio_url``, 403
        ``private_address``/``path_traversal``, 404 ``image_not_found``, 413 ``image_too_large``, 422
        ``image_unreachable``/``image_forbidden``.
        """
        url = (url or "").strip()
        if not url:
            raise bad_request("the task has no image URL")
        ls_url = (label_studio_url or self.settings.label_studio_url or "").strip().rstrip("/")
        parts = split_url(url)
        relative = not parts.scheme and not parts.netloc
        if relative and parts.path.rstrip("/") == LOCAL_FILES_PATH and self.settings.local_files_root:
            return self._read_local(parts.query)
        if not parts.scheme and url.startswith("/") and not url.startswith("//"):
            url = self._on_label_studio(url, ls_url)
        scheme = split_url(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise bad_request(
                f"image URL scheme {scheme + ':' if scheme else '(none)'} is not supported: only http(s) "
                "URLs and Label Studio paths (/data/...)",
                kind="unsupported_url",
            )
        target = _Target(ls_url, authorization)
        self._check_host(url, target)  # before the cache too: a cached URL is no way around the policy
        data = self.cache.get(url)
        if data is None:
            data = self._download(url, target)
            self.cache.put(url, data)
        return data

    def decode(self, data: bytes) -> np.ndarray:
        """Decode image file bytes to ``(H, W, 3)`` uint8 RGB, upright (EXIF orientation applied).

        The size is read from the header and checked against ``max_image_pixels`` before any pixel is
        decoded (413 ``image_too_many_pixels``); anything Pillow cannot read completely is 415
        ``not_an_image``. Palette, greyscale, alpha, CMYK and 16-bit images become 8-bit RGB.
        """
        try:
            with Image.open(io.BytesIO(data), formats=_image_formats()) as image:
                self._check_pixels(image.width, image.height)
                image.load()
                return _to_rgb_array(_upright(image))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ServiceError(
                413,
                "image_too_many_pixels",
                f"image refused as a decompression bomb ({exc}); the limit is "
                f"{self.settings.max_image_pixels} pixels",
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            raise ServiceError(
                415, "not_an_image", f"the image file cannot be decoded ({type(exc).__name__}: {exc})"
            ) from None

    @staticmethod
    def _on_label_studio(path: str, ls_url: str) -> str:
        """The absolute URL of the root-relative ``path`` on Label Studio (which may use a sub-path)."""
        if not ls_url:
            raise bad_request(
                f"{describe_url(path)} is relative to Label Studio, but its URL is unknown (set "
                "LABEL_STUDIO_URL, or Label Studio sends it in /setup)",
                kind="no_label_studio_url",
            )
        if origin(ls_url) is None:
            raise bad_request(
                f"Label Studio URL {ls_url!r} is not an http(s) URL", kind="no_label_studio_url"
            )
        return ls_url + path

    def close(self) -> None:
        """Close this thread's HTTP session (others close when their threads end)."""
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            self._local.session = None

    # ------------------------------------------------------------------ local files

    def _read_local(self, query: str) -> bytes:
        """Read ``?d=<path>`` (relative to ``local_files_root``) from disk; paths leaving the root are 403."""
        values = parse_qs(query, keep_blank_values=True).get("d")
        relative = values[-1] if values else ""
        if not relative:
            raise bad_request("a /data/local-files/ URL without a ?d= path")
        root = Path(self.settings.local_files_root).resolve()
        if os.path.isabs(relative) or relative.startswith(("/", "\\")):
            raise ServiceError(403, "path_traversal", f"local file path {relative!r} is absolute")
        try:
            path = (root / relative).resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise bad_request(f"local file path {relative!r} is not valid: {exc}") from None
        if not path.is_relative_to(root):
            raise ServiceError(
                403, "path_traversal", f"local file path {relative!r} leads outside SEGMASK_LOCAL_FILES_ROOT"
            )
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise FileNotFoundError(relative)
        except (FileNotFoundError, NotADirectoryError):
            raise ServiceError(404, "image_not_found", f"local file {relative!r} does not exist") from None
        except OSError as exc:
            raise ServiceError(
                422, "image_forbidden", f"local file {relative!r} cannot be read: {exc}"
            ) from None
        self._check_size(size, f"local file {relative!r}")
        with path.open("rb") as handle:
            data = handle.read(self.settings.max_image_bytes + 1)  # the file may have grown since stat()
        self._check_size(len(data), f"local file {relative!r}")
        return data

    # ------------------------------------------------------------------ http

    def _check_host(self, url: str, target: _Target) -> None:
        """Refuse (403 ``private_address``) a host resolving to any non-public address, unless the URL is on
        Label Studio's origin or an allowed host; 422 ``image_unreachable`` when the name does not resolve."""
        parts = split_url(url)
        host = (parts.hostname or "").lower()
        if not host:
            raise bad_request(f"image URL {describe_url(url)} has no host", kind="unsupported_url")
        if self._is_trusted_host(url, target):
            return
        try:
            infos = socket.getaddrinfo(host, parts.port or 0, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ServiceError(
                422, "image_unreachable", f"cannot resolve image host {host!r}: {exc}"
            ) from None
        for info in infos:
            address = str(info[4][0])
            if not is_public_address(address):
                raise private_address(host, address, "resolves to")

    def _is_trusted_host(self, url: str, target: _Target) -> bool:
        """Label Studio's exact origin (this request's or the configured one; a /setup may name any host, so
        trust does not extend to its other ports) or an allowed ``host``/``host:port``."""
        parts = split_url(url)
        host = (parts.hostname or "").lower()
        ls_origins = {target.origin, origin(self.settings.label_studio_url)} - {None}
        if origin(url) in ls_origins or host in self._allowed_hosts:
            return True
        netloc = parts.netloc.rsplit("@", 1)[-1].lower()
        return netloc in self._allowed_hosts

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no ~/.netrc credentials, no proxy that would bypass the address check
            session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))  # keep none
            adapter = _DeadlineAdapter()
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def _authorization_for(self, url: str, target: _Target) -> str | None:
        """The Authorization value for ``url``: only for Label Studio's own origin."""
        if target.origin is None or origin(url) != target.origin:
            return None
        return target.authorization

    def _download(self, url: str, target: _Target) -> bytes:
        """GET ``url``, following at most ``MAX_REDIRECTS`` redirects by hand, all within ``image_timeout`` s
        (see :class:`_Deadline`)."""
        with _Deadline(self.settings.image_timeout) as deadline:
            return self._follow(url, target, deadline)

    def _follow(self, url: str, target: _Target, deadline: _Deadline) -> bytes:
        current = url
        on_label_studio = True  # False once the chain has left Label Studio: no token after a third party
        for hop in range(MAX_REDIRECTS + 1):
            if hop:
                self._check_redirect(current, target)
            authorization = self._authorization_for(current, target) if on_label_studio else None
            on_label_studio = on_label_studio and origin(current) == target.origin
            headers = {"Authorization": authorization} if authorization else {}
            response = self._get(current, headers, deadline, target)
            with response:
                if response.status_code in REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise ServiceError(
                            422,
                            "image_unreachable",
                            f"{describe_url(current)} answered {response.status_code} without a Location",
                        )
                    logger.debug("image redirect %s -> %s", describe_url(current), describe_url(location))
                    current = urljoin(current, location)
                    continue
                self._check_status(response, current, authorization)
                data = self._read_body(response, current, deadline)
            logger.debug("downloaded %s (%d bytes)", describe_url(current), len(data))
            return data
        raise ServiceError(
            422, "image_unreachable", f"{describe_url(url)}: more than {MAX_REDIRECTS} redirects"
        )

    def _check_redirect(self, url: str, target: _Target) -> None:
        scheme = split_url(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise bad_request(
                f"image URL redirects to the unsupported scheme {scheme or '(none)'}:", kind="unsupported_url"
            )
        self._check_host(url, target)

    def _get(
        self, url: str, headers: dict[str, str], deadline: _Deadline, target: _Target
    ) -> requests.Response:
        remaining = deadline.remaining
        if remaining <= 0:
            raise self._timed_out(url)
        trusted = self._is_trusted_host(url, target)

        def check(host: str, address: str) -> None:
            if not trusted and not is_public_address(address):
                raise private_address(host, address, "connected to")

        try:
            with peer_check(check):
                response = self._session().get(
                    url, headers=headers, stream=True, allow_redirects=False, timeout=remaining
                )
        except requests.RequestException as exc:
            if isinstance(exc, requests.Timeout) or deadline.passed:
                raise self._timed_out(url) from None
            raise ServiceError(
                422, "image_unreachable", f"cannot download {describe_url(url)}: {type(exc).__name__}"
            ) from None
        if deadline.passed:
            # The deadline's shutdown may have ended the headers early (http.client takes the end of the
            # stream for the end of the headers): never follow or read a response cut that way.
            response.close()
            raise self._timed_out(url)
        return response

    def _timed_out(self, url: str) -> ServiceError:
        return ServiceError(
            422,
            "image_unreachable",
            f"downloading {describe_url(url)} took more than SEGMASK_IMAGE_TIMEOUT "
            f"({self.settings.image_timeout:g} s); it was abandoned",
        )

    def _check_status(self, response: requests.Response, url: str, authorization: str | None) -> None:
        status = response.status_code
        if status in (401, 403):
            raise ServiceError(
                422,
                "image_forbidden",
                f"{describe_url(url)} answered {status} with credentials: {credential_kind(authorization)} "
                "(check LABEL_STUDIO_API_KEY, or enable legacy tokens in Label Studio)",
            )
        if status == 404:
            raise ServiceError(422, "image_unreachable", f"{describe_url(url)} answered 404 (not found)")
        if status != 200:
            raise ServiceError(422, "image_unreachable", f"{describe_url(url)} answered HTTP {status}")

    def _read_body(self, response: requests.Response, url: str, deadline: _Deadline) -> bytes:
        """The body, refused (413) as soon as it is known to exceed ``max_image_bytes``: by its Content-Length
        before reading, and by counting while streaming (a server may omit or misstate Content-Length). A
        body the deadline cut short is a timeout, also when it had no Content-Length to say it was short."""
        declared = response.headers.get("Content-Length", "")
        if declared.strip().isdigit():
            self._check_size(int(declared), describe_url(url))
        chunks: list[bytes] = []
        total = 0
        try:
            for chunk in response.iter_content(CHUNK_BYTES):
                total += len(chunk)
                self._check_size(total, describe_url(url))
                chunks.append(chunk)
                if deadline.passed:
                    raise self._timed_out(url)
        except requests.RequestException as exc:
            if deadline.passed or "timed out" in str(exc).lower():
                raise self._timed_out(url) from None
            raise ServiceError(
                422, "image_unreachable", f"download of {describe_url(url)} broke off: {type(exc).__name__}"
            ) from None
        if deadline.passed:
            raise self._timed_out(url)
        return b"".join(chunks)

    # ------------------------------------------------------------------ limits

    def _check_size(self, size: int, what: str) -> None:
        if size > self.settings.max_image_bytes:
            raise ServiceError(
                413,
                "image_too_large",
                f"{what} is larger than SEGMASK_MAX_IMAGE_BYTES ({self.settings.max_image_bytes} bytes)",
            )

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.settings.max_image_pixels:
            raise ServiceError(
                413,
                "image_too_many_pixels",
                f"image is {width}x{height} = {width * height} pixels, more than SEGMASK_MAX_IMAGE_PIXELS "
                f"({self.settings.max_image_pixels})",
            )


def _image_formats() -> list[str]:
    """The members of ``IMAGE_FORMATS`` this Pillow build can open."""
    Image.init()
    return [name for name in IMAGE_FORMATS if name in Image.OPEN]


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, as browsers (and so Label Studio) do; a broken EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error) as exc:
        logger.warning("ignoring unreadable EXIF orientation: %s", exc)
        return image


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from any Pillow mode; 16- and 32-bit greyscale is scaled, not clipped."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        eight_bit = image.mode == "I" and values.max(initial=0) <= 255
        scale = 1.0 if eight_bit else 255.0 / 65535.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if image.mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(array)
