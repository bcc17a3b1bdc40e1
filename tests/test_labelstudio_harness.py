"""Smoke test of the real-Label-Studio harness: start, create a project, import images, read them back."""

from pathlib import Path

import pytest
from labelstudio_harness import label_studio_or_skip
from ls_bodies import captured

IMAGES = ("000000000009.jpg", "000000000025.jpg")


@pytest.fixture
def polygon_config() -> str:
    """The label config of the captured session (polygon, brush, smart keypoint and rectangle labels)."""
    return captured("setup")["schema"]


@pytest.mark.e2e
def test_label_studio_imports_and_serves_images(tmp_path: Path, coco128: Path, polygon_config: str) -> None:
    images = [coco128 / "images" / name for name in IMAGES]
    with label_studio_or_skip(tmp_path) as ls:
        project = ls.create_project("segmask harness smoke", polygon_config)
        task_ids = ls.import_images(project, images)

        tasks = ls.tasks(project)
        assert sorted(task["id"] for task in tasks) == sorted(task_ids) and len(tasks) == 2, ls.log_tail()
        for task in tasks:
            path = task["data"]["image"]
            assert path.startswith(f"/data/upload/{project}/"), path
            original = next(image for image in images if path.endswith(image.name))
            served = ls.download(path)
            assert served.status_code == 200 and served.content == original.read_bytes(), ls.log_tail()
            assert ls.download(path, authenticated=False).status_code in (401, 403)
