"""HTTP(S) connections that check the address they actually connected to, before sending anything.

Checking a URL's host by resolving it and then letting the HTTP client resolve it again leaves a gap: a DNS
server can answer with a public address to the check and a private one to the client (DNS rebinding). Here
the check runs on the connected socket's peer address, inside urllib3's connection setup, so what is
checked is what is used. ``requests`` sessions get it through :class:`PeerCheckingAdapter`; the check itself
is set per request with :func:`peer_check` (a context variable: concurrent requests in threads each see
their own).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

#: ``check(host, address)`` raises to refuse a connection to ``host`` that reached ``address`` (an IP).
PeerCheck = Callable[[str, str], None]

_current: ContextVar[PeerCheck | None] = ContextVar("segmask_peer_check", default=None)


@contextmanager
def peer_check(check: PeerCheck) -> Iterator[None]:
    """Within the block, every new connection made through a :class:`PeerCheckingAdapter` is passed to
    ``check`` once connected; what it raises closes the socket and propagates to the caller."""
    token = _current.set(check)
    try:
        yield
    finally:
        _current.reset(token)


def _checked(host: str, sock: socket.socket) -> socket.socket:
    check = _current.get()
    if check is not None:
        try:
            check(host, str(sock.getpeername()[0]))
        except BaseException:
            sock.close()
            raise
    return sock


class _CheckedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _checked(self.host, super()._new_conn())


class _CheckedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _checked(self.host, super()._new_conn())


class _CheckedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


class PeerCheckingAdapter(HTTPAdapter):
    """A ``requests`` adapter whose new connections go through the current :func:`peer_check`. Connections
    kept alive in its pools were checked when they were made (pools are per scheme, host and port)."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _CheckedHTTPConnectionPool,
            "https": _CheckedHTTPSConnectionPool,
        }
