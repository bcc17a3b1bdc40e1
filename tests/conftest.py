"""Shared fixtures: the COCO128 data that lives beside the checkout."""

from pathlib import Path

import pytest

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


@pytest.fixture(scope="session")
def coco128() -> Path:
    if not (COCO128 / "instances.json").exists():
        pytest.skip(f"COCO128 not found at {COCO128} (expected ../shared/data/coco128 beside the checkout)")
    return COCO128
