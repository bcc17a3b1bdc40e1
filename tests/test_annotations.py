"""Label Studio annotations -> COCO instances and dataset snapshots."""

import json

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from ls_bodies import captured

from backend.annotations import (
    annotation_instances,
    chosen_annotation,
    label_set,
    region_instance,
    write_dataset,
)
from backend.labelstudio import parse_config
from segmodels.data import CocoInstances

CONFIG = parse_config(captured("setup")["schema"])


def _polygon(points, label="dog"):
    return {
        "type": "polygonlabels",
        "value": {"points": points, "polygonlabels": [label], "closed": True},
        "original_width": 200,
        "original_height": 100,
    }


def _rect(x, y, w, h, label="dog"):
    return {
        "type": "rectanglelabels",
        "value": {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": [label]},
        "original_width": 200,
        "original_height": 100,
    }


def test_a_polygon_in_percent_becomes_a_pixel_mask_and_box():
    inst = region_instance(_polygon([[10, 10], [60, 10], [60, 50], [10, 50]]), 200, 100)
    assert inst["label"] == "dog" and inst["mask"].shape == (100, 200)
    assert inst["box"] == pytest.approx([20, 10, 100, 40], abs=1)


def test_a_brush_rle_becomes_the_same_mask():
    mask = np.zeros((100, 200), bool)
    mask[30:60, 50:120] = True
    region = {
        "type": "brushlabels",
        "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": ["car"]},
        "original_width": 200,
        "original_height": 100,
    }
    inst = region_instance(region, 200, 100)
    assert inst["label"] == "car" and (inst["mask"] == mask).all()


def test_a_rectangle_is_a_box_only_instance():
    inst = region_instance(_rect(10, 20, 30, 40), 200, 100)
    assert inst["mask"] is None and inst["box"] == pytest.approx([20, 20, 60, 40])


def test_a_rotated_rectangle_turns_in_pixels_and_is_clipped_to_the_image():
    rect = _rect(10, 20, 30, 40)
    rect["value"]["rotation"] = 90
    # 60 x 40 px at (20, 20) px turned a quarter clockwise about that corner: x -20..20, y 20..80 px.
    assert region_instance(rect, 200, 100)["box"] == pytest.approx([0, 20, 20, 60])


def test_keypoints_are_prompts_not_instances():
    kp = {"type": "keypointlabels", "value": {"x": 5, "y": 5, "keypointlabels": ["dog"]}}
    assert region_instance(kp, 200, 100) is None


def test_a_rectangle_that_prompted_a_mask_of_the_same_label_is_dropped():
    annotation = {
        "result": [
            _polygon([[10, 10], [60, 10], [60, 50], [10, 50]]),
            _rect(9, 9, 52, 42),
            _rect(70, 60, 20, 30, label="person"),
        ]
    }
    instances = annotation_instances(annotation, 200, 100)
    assert [(i["label"], i["mask"] is None) for i in instances] == [("dog", False), ("person", True)]


def test_the_ground_truth_annotation_wins_then_the_latest_and_cancelled_ones_never_count():
    task = {
        "annotations": [
            {"id": 1, "result": [_rect(1, 1, 5, 5)], "updated_at": "2026-01-02"},
            {"id": 2, "result": [_rect(1, 1, 5, 5)], "updated_at": "2026-01-03", "was_cancelled": True},
            {"id": 3, "result": [_rect(1, 1, 5, 5)], "updated_at": "2026-01-01", "ground_truth": True},
            {"id": 4, "result": [], "updated_at": "2026-01-09"},
        ]
    }
    assert chosen_annotation(task)["id"] == 3
    task["annotations"][2]["ground_truth"] = False
    assert chosen_annotation(task)["id"] == 1
    assert chosen_annotation({"annotations": [{"id": 9, "result": [], "was_cancelled": False}]}) is None


def test_the_label_set_is_the_output_and_box_controls_labels_in_order():
    assert label_set(CONFIG) == ["person", "dog", "car"]


def test_a_snapshot_is_a_coco_dataset_the_trainer_reads(tmp_path, coco128):
    image = (coco128 / "images" / "000000000042.jpg").read_bytes()
    tasks = [
        {
            "id": 7,
            "data": {"image": "/data/upload/1/a.jpg"},
            "annotations": [
                {
                    "id": 1,
                    "result": [
                        _polygon([[30, 10], [90, 10], [90, 60], [30, 60]], "dog"),
                        _rect(5, 60, 20, 30, "puppy"),
                    ],
                }
            ],
        },
        {
            "id": 10,
            "data": {"image": "/data/upload/1/b.jpg"},
            "annotations": [{"id": 2, "result": [_polygon([[10, 10], [40, 10], [40, 40]], "person")]}],
        },
        {"id": 11, "data": {"image": "/data/upload/1/c.jpg"}, "annotations": []},
    ]
    summary = write_dataset(tasks, CONFIG, lambda url: image, tmp_path)
    coco = json.loads((tmp_path / "instances.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["person", "dog", "car", "puppy"]
    assert summary.images == 2 and summary.instances == 3 and summary.skipped == {"no usable annotation": 1}
    assert summary.train_image_ids == [7] and summary.heldout_image_ids == [10]
    dataset = CocoInstances(tmp_path, min_area=0)
    assert {dataset.categories[i.category_id] for i in dataset.instances} == {"dog", "puppy", "person"}
