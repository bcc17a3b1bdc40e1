"""Shared fixtures: the repository's COCO128 data (data/coco128) and captured Label Studio requests."""

from pathlib import Path

import pytest

from backend.settings import DEFAULT_DATA_DIR


@pytest.fixture(scope="session")
def coco128() -> Path:
    """The COCO128 directory in the repository (``instances.json`` + ``images/``, see data/README.md)."""
    return DEFAULT_DATA_DIR


@pytest.fixture(scope="session")
def ls_request():
    """``ls_request(name)``: the JSON body of a request captured from a real Label Studio 1.23.2
    (tests/fixtures/label-studio-requests/<name>.json)."""
    from ls_bodies import captured

    return captured


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
