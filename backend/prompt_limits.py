"""How large a click/box prompt may be, for every tool that sends one (Label Studio, CVAT)."""

from __future__ import annotations

from backend.errors import bad_request

#: Points in one prompt: each is a step of the click head when the prompt is new, so this bounds a request's
#: time (an annotator's object takes a few to a few dozen clicks).
MAX_PROMPT_POINTS = 64


def check_prompt_size(points: int) -> None:
    """400 ``too_many_points`` for a prompt of more than :data:`MAX_PROMPT_POINTS` points."""
    if points > MAX_PROMPT_POINTS:
        raise bad_request(
            f"the prompt has {points} points; at most {MAX_PROMPT_POINTS} are accepted", "too_many_points"
        )
