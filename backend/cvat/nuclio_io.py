"""Request and response plumbing shared by the nuclio detector and interactor handlers.

Every answer is JSON. Problems a CVAT user must see are ``{"error": kind, "message": ...}`` with a 4xx
status (CVAT shows the message): 400 for a missing/undecodable image or bad prompt, 413 for an image over
the size limits. Anything else is logged with its traceback and answered 500.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

from backend.errors import ServiceError, bad_request

log = logging.getLogger(__name__)

# nuclio's HTTP trigger refuses bodies over maxRequestBodySize (32 MiB by default, as in function.yaml) before
# the handler runs; this handler-side limit on the base64 string is what turns a too-large image into a clear
# 413 when the trigger's limit is raised above it.
DEFAULT_MAX_BASE64_CHARS = 32 * 1024 * 1024


def max_base64_chars() -> int:
    """``SEGMASK_MAX_BASE64_CHARS`` (default 32 MiB of base64, ~24 MB of image file)."""
    return int(os.environ.get("SEGMASK_MAX_BASE64_CHARS", DEFAULT_MAX_BASE64_CHARS))


def request_body(event: Any) -> dict:
    """The event's JSON body as a dict (nuclio passes a dict for application/json, else bytes or str)."""
    body = event.body
    if isinstance(body, bytes | bytearray | str):
        try:
            body = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad_request(f"the request body is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def json_response(context: Any, payload: object, status: int = 200) -> Any:
    return context.Response(
        body=json.dumps(payload), headers={}, content_type="application/json", status_code=status
    )


def serve(context: Any, event: Any, answer: Callable[[dict], object]) -> Any:
    """Run ``answer(body)`` and turn its result, or the ServiceError it raised, into a JSON response."""
    try:
        return json_response(context, answer(request_body(event)))
    except ServiceError as exc:
        context.logger.warn(f"refused: {exc.message} ({exc.kind})")
        return json_response(context, exc.to_json(), exc.status)
    except Exception:
        log.exception("the handler failed")
        return json_response(
            context, {"error": "internal", "message": "internal error, see the function logs"}, 500
        )
