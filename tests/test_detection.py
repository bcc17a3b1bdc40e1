"""Pre-annotation: RoI sampling for MultiPathNet, mask NMS, and detect() with the shipped checkpoint."""

import numpy as np
import pytest

from segmodels.data import CocoInstances
from segmodels.geometry import mask_iou
from segmodels.predictor import DEFAULT_CHECKPOINT, PAD, load_predictor, mask_nms
from segmodels.train_multipathnet import FG_FRACTION, ImageRois, sample_rois, to_trunk


def _rois(ious: list[float]) -> ImageRois:
    n = len(ious)
    return ImageRois(0, np.zeros((n, 4)), np.array(ious)[:, None], np.zeros((1, 4)), np.array([1]))


def test_sampled_rois_are_at_most_a_quarter_foreground():
    rois = _rois([0.9] * 50 + [0.3] * 100)
    idx = sample_rois(rois, np.random.default_rng(0), n=64)
    assert len(idx) == 64 and len(set(idx.tolist())) == 64
    assert (rois.iou[idx, 0] >= 0.5).sum() == int(64 * FG_FRACTION)


def test_sampled_background_excludes_rois_below_a_tenth_iou():
    rois = _rois([0.9] * 2 + [0.05] * 100 + [0.2] * 10)
    idx = sample_rois(rois, np.random.default_rng(1), n=64)
    assert (rois.iou[idx, 0] >= 0.1).all() and len(idx) == 12


def test_boxes_map_to_trunk_pixels_and_mirror():
    boxes = np.array([[10.0, 20.0, 30.0, 60.0]])
    assert to_trunk(boxes, 1.0, 1.0).tolist() == [[10 + PAD, 20 + PAD, 30 + PAD, 60 + PAD]]
    assert to_trunk(boxes, 0.5, 0.5, width=100).tolist() == [[35 + PAD, 10 + PAD, 45 + PAD, 30 + PAD]]


def _disc(cx: int, cy: int, r: int) -> np.ndarray:
    ys, xs = np.mgrid[0:100, 0:100]
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r


def test_mask_nms_keeps_the_best_of_duplicates_and_distinct_objects():
    masks = np.stack([_disc(30, 30, 15), _disc(31, 30, 15), _disc(70, 70, 15)])
    assert mask_nms(masks, np.array([0.5, 0.9, 0.4]), iou=0.5) == [1, 2]


def test_mask_nms_keeps_overlapping_masks_below_the_threshold():
    masks = np.stack([_disc(40, 50, 20), _disc(60, 50, 20)])
    assert sorted(mask_nms(masks, np.array([0.5, 0.6]), iou=0.5)) == [0, 1]


@pytest.mark.slow
def test_detect_with_the_shipped_weights_labels_an_object_it_was_trained_on(coco128):
    """The whole chain (proposals, refinement, MultiPathNet, scoring, NMS) wired to the shipped weights, on a
    training image: its dog must come back as a dog. Held-out label quality is what ``segmask evaluate``
    measures (README); it is far lower."""
    predictor = load_predictor()
    if predictor.model.multipathnet is None:
        pytest.fail(f"the shipped checkpoint {DEFAULT_CHECKPOINT} has no MultiPathNet stage")
    train = CocoInstances(coco128, "train")
    index = next(i for i, im in enumerate(train.images) if im["id"] == 42)
    predictor.set_image(train.image(index))
    detections = predictor.detect()
    dog = train.mask(train.instances_by_image[index][0])
    assert any(d.label == "dog" and mask_iou(d.mask, dog) >= 0.5 for d in detections)
    assert all(d.score >= 0.5 for d in detections) and len(detections) <= 100
