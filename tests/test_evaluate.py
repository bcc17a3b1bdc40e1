import numpy as np
import pytest
from shapes import rectangle

from segmodels.baselines import filled_box_mask, grabcut_mask
from segmodels.calibration import reliability
from segmodels.coco_scoring import average_recall, coco_ground_truth, detection_ap
from segmodels.data import CocoInstances
from segmodels.eval_detection import match_detections, precision_recall
from segmodels.eval_interactive import InstanceResult, summarise
from segmodels.eval_labels import LabelResult, label_summary
from segmodels.eval_proposals import proposal_results
from segmodels.eval_report import before_after_table, label_tables, plot_reliability
from segmodels.export import detections_to_coco
from segmodels.geometry import coco_segmentation_to_mask, mask_iou, mask_to_box
from segmodels.predictor import Detection, Mask


def test_filled_box_of_a_rectangle_is_exact():
    gt = rectangle(48, 64, 7, 9, 33, 40)
    assert mask_iou(filled_box_mask(gt), gt) == 1.0


def test_grabcut_finds_a_contrasting_rectangle_and_refuses_a_whole_image_box():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, size=(80, 100, 3), dtype=np.uint8)
    gt = rectangle(80, 100, 30, 20, 70, 60)
    image[gt] = rng.integers(190, 255, size=(int(gt.sum()), 3), dtype=np.uint8)
    assert mask_iou(grabcut_mask(image, np.array([25.0, 15.0, 75.0, 65.0])), gt) > 0.9
    assert grabcut_mask(image, np.array([0.0, 0.0, 100.0, 80.0])) is None


@pytest.fixture(scope="module")
def few_images(coco128):
    dataset = CocoInstances(coco128, "all")
    counts = {}
    for a in dataset.annotations:
        counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    # Three images with a handful of annotations, so every GT fits in the top 10.
    indices = [i for i, im in enumerate(dataset.images) if 2 <= counts.get(im["id"], 0) <= 8][:3]
    assert len(indices) == 3
    return dataset, indices


def gt_masks(dataset: CocoInstances, index: int) -> list[np.ndarray]:
    im = dataset.images[index]
    return [
        coco_segmentation_to_mask(a["segmentation"], im["height"], im["width"])
        for a in dataset.annotations
        if a["image_id"] == im["id"] and not a.get("iscrowd", 0)
    ]


def recall_of(dataset: CocoInstances, indices: list[int], masks_of) -> dict:
    segm, bbox = [], []
    for index in indices:
        proposals = [Mask(m, 1.0) for m in masks_of(index)]
        s, b = proposal_results(dataset.images[index]["id"], proposals, min(dataset.categories))
        segm += s
        bbox += b
    return average_recall(coco_ground_truth(dataset, indices), segm, bbox)


def test_average_recall_is_one_for_the_gt_masks_themselves(few_images):
    dataset, indices = few_images
    ar = recall_of(dataset, indices, lambda i: gt_masks(dataset, i))
    for iou_type in ("segm", "bbox"):
        for n in (10, 100, 1000):
            assert ar[iou_type][f"AR@{n}"] == pytest.approx(1.0)


def test_average_recall_is_zero_for_empty_or_misplaced_masks(few_images):
    dataset, indices = few_images
    empty = recall_of(dataset, indices, lambda i: [np.zeros_like(m) for m in gt_masks(dataset, i)])
    assert empty["segm"]["AR@100"] == 0.0 and empty["bbox"]["AR@100"] == 0.0

    def flipped(index: int) -> list[np.ndarray]:
        return [np.flipud(np.fliplr(m)) for m in gt_masks(dataset, index)]

    wrong = recall_of(dataset, indices, flipped)
    assert wrong["segm"]["AR@100"] < 0.1


def result(size: str, iou: float, seconds: float) -> InstanceResult:
    area = 50.0**2 if size == "medium" else 200.0**2
    return InstanceResult(1, 1, 1, area, size, [0, 0, 1, 1], box_iou=iou, box_seconds=seconds)


def test_summarise_success_rates_by_size():
    results = [
        result("medium", 0.9, 1.0),
        result("medium", 0.6, 2.0),
        result("medium", 0.3, 3.0),
        result("large", 0.8, 4.0),
        result("large", 0.76, 5.0),
    ]
    box = summarise(results)["box"]
    assert box["median_seconds"] == 3.0
    assert box["all"]["n"] == 5 and box["medium"]["n"] == 3 and box["large"]["n"] == 2
    assert box["all"]["miou"] == pytest.approx(3.36 / 5)
    assert box["medium"]["success@0.5"] == pytest.approx(2 / 3)
    assert box["medium"]["success@0.75"] == pytest.approx(1 / 3)
    assert box["medium"]["success@0.85"] == pytest.approx(1 / 3)
    assert box["large"]["success@0.5"] == 1.0
    assert box["large"]["success@0.75"] == 1.0
    assert box["large"]["success@0.85"] == 0.0
    assert box["all"]["success@0.75"] == pytest.approx(3 / 5)
    assert set(summarise(results)) == {"box"}


def label(category: int, predicted: int, evaluated: bool = True, known: bool = True) -> LabelResult:
    names = {1: "person", 2: "bicycle", 3: "car", 4: "motorcycle"}
    return LabelResult(
        1, 1, category, 2000.0, evaluated, predicted, names[predicted], 0.5, 0.1 if known else None
    )


def test_label_summary_top1_per_class_and_confusions():
    results = [
        label(1, 1),
        label(1, 1),
        label(1, 3),
        label(1, 1),
        label(3, 1),
        label(3, 2),
        label(3, 1),
        label(2, 2),  # a rare class: counts overall, no row of its own
        label(4, 1, known=False),  # not in the label set: always wrong
        label(2, 2, evaluated=False),  # small: only in the all-sizes line
        label(2, 1, evaluated=False),
    ]
    names = {1: "person", 2: "bicycle", 3: "car", 4: "motorcycle"}
    summary = label_summary(results, names)
    assert summary["n"] == 9 and summary["top1"] == pytest.approx(4 / 9)
    assert summary["all_sizes"] == {"n": 11, "top1": pytest.approx(5 / 11)}
    assert summary["not_in_label_set"] == 1
    assert summary["per_class"] == [
        {"category_id": 1, "name": "person", "n": 4, "top1": 0.75, "confusion": "car", "confusion_n": 1},
        {"category_id": 3, "name": "car", "n": 3, "top1": 0.0, "confusion": "person", "confusion_n": 2},
    ]
    (_, _, top_rows), (_, _, class_rows) = label_tables(summary)
    assert top_rows[1] == ["all sizes", "11", "0.455"]
    assert class_rows[1] == ["car", "3", "0.000", "person (2)"]


def test_label_summary_without_instances():
    summary = label_summary([], {})
    assert summary["n"] == 0 and summary["top1"] is None and summary["per_class"] == []
    assert summary["all_sizes"] == {"n": 0, "top1": None}


def gt_detections_of(dataset: CocoInstances, index: int, category_of=lambda c: c) -> list[Detection]:
    out = []
    for n, mask in enumerate(gt_masks(dataset, index)):
        ann = [
            a
            for a in dataset.annotations
            if a["image_id"] == dataset.images[index]["id"] and not a.get("iscrowd", 0)
        ][n]
        category = category_of(ann["category_id"])
        out.append(Detection(str(category), category, 0.9, mask, mask_to_box(mask)))
    return out


def test_detection_ap_is_one_for_the_gt_and_zero_for_wrong_labels(few_images):
    dataset, indices = few_images
    gt = coco_ground_truth(dataset, indices)

    def ap(category_of) -> dict:
        results = []
        for index in indices:
            results += detections_to_coco(
                gt_detections_of(dataset, index, category_of), dataset.images[index]["id"]
            )
        return detection_ap(gt, results)

    right = ap(lambda c: c)
    for iou_type in ("segm", "bbox"):
        assert right[iou_type]["AP"] == pytest.approx(1.0)
        assert right[iou_type]["AP50"] == pytest.approx(1.0)
    others = sorted(dataset.categories)
    wrong = ap(lambda c: others[(others.index(c) + 1) % len(others)])
    assert wrong["segm"]["AP"] == 0.0 and wrong["bbox"]["AP"] == 0.0
    assert detection_ap(gt, [])["segm"]["AP50"] == 0.0


def test_matching_counts_right_labels_any_label_and_found_instances_once(coco128):
    dataset = CocoInstances(coco128, "val")
    index = next(i for i, insts in enumerate(dataset.instances_by_image) if len(insts) >= 2)
    first, second = dataset.instances_by_image[index][:2]
    mask = dataset.mask(first)
    nothing = np.zeros_like(mask)

    def det(inst_mask: np.ndarray, class_id: int) -> Detection:
        return Detection("x", class_id, 0.9, inst_mask, np.zeros(4))

    detections = [
        det(mask, first.category_id),  # right
        det(mask, first.category_id),  # a duplicate: the instance is taken
        det(dataset.mask(second), second.category_id + 1000),  # right mask, wrong label
        det(nothing, first.category_id),  # no object
    ]
    right, any_label, found = match_detections(detections, dataset.instances_by_image[index], dataset)
    assert (right, any_label) == (1, 2)
    assert found == int(first.area > 32**2)


def test_precision_recall_from_match_counts():
    row = precision_recall(np.array([8, 2, 4, 3]), images=4, instances=12)
    assert row == {
        "per_image": 2.0,
        "precision": 0.25,
        "mask_precision": 0.5,
        "last_mask_precision": 0.5,
        "recall": 0.25,
    }
    assert precision_recall(np.zeros(4), images=2, instances=0)["precision"] is None


def test_the_precision_of_added_detections_comes_from_the_next_smaller_cap():
    row = precision_recall(np.array([8, 2, 4, 3]), images=4, instances=12, fewer=np.array([4, 2, 3, 2]))
    assert row["last_mask_precision"] == 0.25
    assert (
        precision_recall(np.array([4, 2, 3, 2]), 4, 12, fewer=np.array([4, 2, 3, 2]))["last_mask_precision"]
        is None
    )


def _detection_metrics() -> dict:
    ap = {"AP": 0.1, "AP50": 0.2}
    return {
        "calibrated": True,
        "default_threshold": 0.5,
        "mean_detections_at_default": 2.0,
        "precision_at_default": 0.6,
        "recall_at_default": 0.3,
        "found_per_image_at_default": 1.2,
        "reliability": reliability(np.array([0.05, 0.55, 0.95]), np.array([0.0, 1.0, 1.0])),
        "confident": 0.9,
        "confident_detections": 1,
        "confident_wrong": 0,
        "segm": ap,
        "before": {
            "max_detections": 1,
            "per_image": 1.0,
            "precision": 0.5,
            "recall": 0.1,
            "found_per_image": 0.5,
            "segm": ap,
        },
    }


def test_the_report_compares_pre_annotation_before_and_after(tmp_path):
    title, headers, rows = before_after_table(_detection_metrics())
    assert [r[0].split(":")[0] for r in rows] == ["before", "after"]
    assert (
        rows[1][headers.index("precision")] == "0.600"
        and rows[1][headers.index("wrong at >= 0.9")] == "0 of 1"
    )
    plot_reliability(tmp_path / "reliability.png", _detection_metrics()["reliability"], "test")
    assert (tmp_path / "reliability.png").stat().st_size > 0
