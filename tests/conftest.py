"""Shared fixtures: the COCO128 data that lives beside the checkout."""

from pathlib import Path

import pytest

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


@pytest.fixture(scope="session")
def coco128() -> Path:
    if not (COCO128 / "instances.json").exists():
        pytest.skip(f"COCO128 not found at {COCO128} (expected ../shared/data/coco128 beside the checkout)")
    return COCO128


@pytest.fixture(scope="session")
def ls_request():
    """``ls_request(name)``: the JSON body of a request captured from a real Label Studio 1.23.2."""
    from ls_bodies import LS_REQUESTS, captured

    def load(name: str) -> dict:
        if not (LS_REQUESTS / f"{name}.json").exists():
            pytest.skip(f"captured Label Studio request {name} not found in {LS_REQUESTS}")
        return captured(name)

    return load


@pytest.fixture(scope="session")
def upload_server(coco128):
    """Label Studio's upload serving, for backend tests (see tests/upload_server.py)."""
    from upload_server import UploadServer

    server = UploadServer(coco128 / "images")
    yield server
    server.close()


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio 1.23.2 for the session (tests/labelstudio_harness.py); skips if it cannot start,
    fails instead when SEGMASK_REQUIRE_LABEL_STUDIO=1 (CI)."""
    from labelstudio_harness import label_studio_session

    yield from label_studio_session(tmp_path_factory)
