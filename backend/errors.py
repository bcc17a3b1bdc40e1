"""The one exception type the serving layer raises for problems a client or an operator must see.

Every :class:`ServiceError` becomes an HTTP answer ``{"error": kind, "message": message}`` with ``status``,
and is counted in ``/metrics`` by ``kind``. Anything else that escapes a route is a bug: it is logged with
its traceback and answered as a 500 ``internal``.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A problem with a clear cause: ``status`` (HTTP), ``kind`` (short stable tag for metrics and
    clients, e.g. ``"bad_request"``, ``"image_too_large"``) and a human ``message`` naming the problem."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message

    def to_json(self) -> dict:
        return {"error": self.kind, "message": self.message}


def bad_request(message: str, kind: str = "bad_request") -> ServiceError:
    """A 400: the request itself is malformed or names something that does not exist."""
    return ServiceError(400, kind, message)
