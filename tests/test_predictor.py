"""The predictor API: prompts, caching, proposals, and the shipped model on real COCO128 images."""

import numpy as np
import pytest
import torch

from segmodels.annotator import click_point, next_click
from segmodels.calibration import Calibration
from segmodels.data import CocoInstances
from segmodels.geometry import mask_iou
from segmodels.model import ModelConfig, SegmentationModel
from segmodels.predictor import DEFAULT_CHECKPOINT, MaskPredictor, load_predictor, paste_window
from segmodels.uncertainty import detect_with_uncertainty


@pytest.fixture(scope="module")
def untrained() -> MaskPredictor:
    torch.manual_seed(0)
    return MaskPredictor(SegmentationModel(ModelConfig()), scales=(0.5, 1.0))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(120, 160, 3), dtype=np.uint8)


def test_segment_before_set_image_is_an_error():
    predictor = MaskPredictor(SegmentationModel(ModelConfig()), scales=(1.0,))
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.segment([[10, 10]], [1])


def test_a_predictor_leaves_the_callers_model_as_it_was():
    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    MaskPredictor(model, scales=(1.0,))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_non_rgb_images_are_refused(untrained):
    with pytest.raises(ValueError, match="uint8 RGB"):
        untrained.set_image(np.zeros((10, 10), np.uint8))


def test_a_prompt_needs_a_positive_point_or_a_box(untrained, image):
    untrained.set_image(image)
    with pytest.raises(ValueError, match="positive point or a box"):
        untrained.segment([[10, 10]], [0])


def test_mismatched_points_and_labels_are_refused(untrained, image):
    untrained.set_image(image)
    with pytest.raises(ValueError, match="labels"):
        untrained.segment([[10, 10], [20, 20]], [1])


def test_the_heads_a_checkpoint_lacks_are_refused_by_name(untrained, image):
    untrained.set_image(image)
    point = np.array([[80.0, 60.0]])
    with pytest.raises(RuntimeError, match="no click head"):
        untrained.correct(np.zeros((120, 160), bool), point, np.ones(1, bool))
    cands, coarse = untrained.coarse_windows(point)
    with pytest.raises(RuntimeError, match="no quality head"):
        untrained.predicted_iou(cands, coarse, point[0])


def test_box_prompt_mask_stays_inside_the_box(untrained, image):
    untrained.set_image(image)
    result = untrained.segment(box=[40, 30, 100, 90])
    assert result.mask.shape == image.shape[:2]
    ys, xs = np.nonzero(result.mask)
    if len(xs):
        assert xs.min() >= 40 - 2 and xs.max() < 100 + 2 and ys.min() >= 30 - 2 and ys.max() < 90 + 2


@pytest.mark.parametrize(
    "refinement", [{"box_steps": 1, "box_grabcut": False}, {"box_steps": 2, "box_grabcut": True}]
)
def test_a_box_refined_by_the_click_head_and_grabcut_stays_inside_the_box(image, refinement):
    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig(click_head=True))
    predictor = MaskPredictor(model, scales=(0.5, 1.0), **refinement)
    predictor.set_image(image)
    result = predictor.segment(box=[40, 30, 100, 90])
    ys, xs = np.nonzero(result.mask)
    if len(xs):
        assert xs.min() >= 40 - 2 and xs.max() < 100 + 2 and ys.min() >= 30 - 2 and ys.max() < 90 + 2


def test_a_box_reaching_far_past_the_image_is_served_inside_the_image(image):
    torch.manual_seed(0)
    predictor = MaskPredictor(SegmentationModel(ModelConfig(click_head=True)), scales=(0.5, 1.0))
    predictor.set_image(image)
    result = predictor.segment(box=[185, 0, 2400, 120])  # starts past the right edge; its tolerance does not
    assert result.mask.shape == image.shape[:2]
    assert not result.mask[:, :130].any()


def test_click_head_step_counts_below_their_minimum_are_refused():
    model = SegmentationModel(ModelConfig())
    for steps in ({"first_click_steps": -1}, {"box_steps": -1}, {"correction_steps": 0}):
        with pytest.raises(ValueError, match="click-head steps"):
            MaskPredictor(model, scales=(1.0,), **steps)


def test_second_prompt_reuses_the_image_features(untrained, image):
    untrained.set_image(image)
    features = untrained.features
    untrained.segment([[50, 50]], [1])
    untrained.segment([[50, 50], [80, 60]], [1, 0])
    assert untrained.features is features


def test_prompt_heads_on_a_block_equal_the_dense_heads(untrained, image):
    untrained.set_image(image)
    level = untrained.features.levels[-1]
    rows, cols = [0, 1, 3], [2, 2, 0]
    vec, scores = untrained.cell_heads(level, rows, cols)
    untrained.dense_heads(level)
    dense_vec, dense_scores = untrained.cell_heads(level, rows, cols)
    torch.testing.assert_close(vec, dense_vec, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(scores, dense_scores, atol=1e-4)


def test_a_click_runs_the_heads_only_near_it(untrained, image):
    untrained.set_image(image)
    untrained.segment([[60, 50]], [1])
    assert all(level.scores is None for level in untrained.features.levels)


def test_proposals_are_sorted_by_score_and_sized_like_the_image(untrained, image):
    untrained.set_image(image)
    proposals = untrained.propose(k=20)
    assert len(proposals) == 20
    assert all(p.mask.shape == image.shape[:2] and p.mask.dtype == bool for p in proposals)
    scores = [p.score for p in proposals]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)


def _labelling(mask_threshold: float) -> MaskPredictor:
    """An untrained predictor with a MultiPathNet over two classes (no ImageNet label head)."""
    torch.manual_seed(0)
    config = ModelConfig(classes=["cat", "dog"], class_ids=[17, 18], label_head=False)
    return MaskPredictor(SegmentationModel(config), scales=(0.5, 1.0), mask_threshold=mask_threshold)


def test_proposals_time_their_stages_when_asked(untrained, image):
    untrained.set_image(image)
    timings: dict[str, float] = {}
    proposals = untrained.propose(k=5, timings=timings)
    assert set(timings) == {"top_windows", "window_logits", "paste"} and min(timings.values()) >= 0
    assert [(p.score, p.mask.sum()) for p in proposals] == [
        (p.score, p.mask.sum()) for p in untrained.propose(5)
    ]


def test_the_detection_pass_gives_every_candidate_its_class_probabilities_boxes_and_score(image):
    predictor = _labelling(mask_threshold=0.5)
    predictor.set_image(image)
    timings: dict[str, float] = {}
    candidates = predictor.detection_candidates(proposals=20, timings=timings)
    r = len(candidates)
    assert 0 < r <= 20 and all(m.mask.any() for m in candidates.masks)
    assert candidates.probs.shape == (r, 3) and candidates.boxes.shape == (r, 3, 4)
    assert candidates.scores.shape == candidates.objectness.shape == (r,)
    assert set(timings) == {"proposals", "classify", "scoring"}
    shown = predictor.label_candidates(candidates, score_threshold=0.0, max_detections=r)
    detected = predictor.detect(score_threshold=0.0, max_detections=r, proposals=20)
    assert [(d.label, d.score) for d in shown] == [(d.label, d.score) for d in detected]


@pytest.mark.slow
def test_a_calibrated_predictor_scores_candidates_by_their_calibrated_probability(image):
    predictor = _labelling(mask_threshold=0.5)
    # probability = sigmoid(objectness logit): the window's objectness probability itself.
    predictor.calibration = Calibration("logistic", ("objectness",), [0.0], [1.0], [1.0], 0.0)
    predictor.set_image(image)
    candidates = predictor.detection_candidates(proposals=20)
    assert candidates.scores == pytest.approx(candidates.objectness)
    detected = predictor.detect(score_threshold=0.0, proposals=20)
    scores = [d.score for d in detected]
    assert detected and scores == sorted(scores, reverse=True)
    assert all(np.isclose(candidates.objectness, s).any() for s in scores)


def test_an_image_without_a_proposal_mask_gives_no_candidate_and_no_detection(image):
    predictor = _labelling(mask_threshold=1 - 1e-12)  # no window logit reaches it: every mask is empty
    predictor.set_image(image)
    candidates = predictor.detection_candidates(proposals=20)
    assert len(candidates) == 0 and candidates.probs.shape == (0, 3) and candidates.boxes.shape == (0, 3, 4)
    assert predictor.detect(score_threshold=0.0) == []
    detections, measure = detect_with_uncertainty(predictor, score_threshold=0.0)
    assert detections == [] and measure["candidates"] == 0 and measure["uncertainty"] == 0.0


def test_pasting_a_window_covers_exactly_its_box():
    region, (y0, y1, x0, x1) = paste_window(
        np.full((56, 56), 5.0, np.float32), np.array([10.0, 20, 50, 60]), 100, 100
    )
    assert (y0, y1, x0, x1) == (20, 60, 10, 50) and (region > 0).all()


def test_pasting_is_clipped_to_the_image():
    region, (y0, y1, x0, x1) = paste_window(
        np.zeros((56, 56), np.float32), np.array([-30.0, -30, 20, 20]), 50, 50
    )
    assert (y0, y1, x0, x1) == (0, 20, 0, 20) and region.shape == (20, 20)


def test_thin_images_smaller_than_a_window_are_supported(untrained):
    untrained.set_image(np.zeros((40, 300, 3), np.uint8))
    assert untrained.segment([[150, 20]], [1]).mask.shape == (40, 300)


# ---- the shipped default model on held-out COCO128 images --------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> MaskPredictor:
    if not (DEFAULT_CHECKPOINT / "model.json").exists():
        pytest.fail(f"no shipped checkpoint at {DEFAULT_CHECKPOINT}")
    return load_predictor()


def _largest_held_out_object(shipped: MaskPredictor, coco128, image_id: int) -> np.ndarray:
    """The GT mask of the largest object of held-out image ``image_id``, whose image ``shipped`` is set to."""
    val = CocoInstances(coco128, "val")
    index = next(i for i, im in enumerate(val.images) if im["id"] == image_id)
    shipped.set_image(val.image(index))
    return val.mask(max(val.instances_by_image[index], key=lambda inst: inst.area))


@pytest.mark.slow
@pytest.mark.parametrize("image_id", [25, 400, 450])
def test_one_click_on_a_large_held_out_object_finds_it(shipped, coco128, image_id):
    gt = _largest_held_out_object(shipped, coco128, image_id)
    result = shipped.segment([click_point(gt)], [1])
    assert mask_iou(result.mask, gt) > 0.5
    assert result.polygon is not None and len(result.polygon) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("image_id", [25, 400, 450])
def test_a_box_around_a_large_held_out_object_finds_it(shipped, coco128, image_id):
    gt = _largest_held_out_object(shipped, coco128, image_id)
    ys, xs = np.nonzero(gt)
    box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert mask_iou(shipped.segment(box=box).mask, gt) > 0.7


@pytest.mark.slow
@pytest.mark.parametrize("image_id", [25, 400, 450])
def test_clicks_reach_085_on_a_large_held_out_object_within_six(shipped, coco128, image_id):
    gt = _largest_held_out_object(shipped, coco128, image_id)
    points, labels = [click_point(gt)], [1]
    for _ in range(6):
        pred = shipped.segment(points, labels).mask
        if mask_iou(pred, gt) >= 0.85:
            return
        (x, y), label = next_click(pred, gt)
        points.append((x, y))
        labels.append(label)
    pytest.fail(f"IoU {mask_iou(pred, gt):.3f} after {len(points) - 1} clicks")


@pytest.mark.slow
def test_a_negative_click_leaves_pixels_far_from_it_unchanged(shipped, coco128):
    gt = _largest_held_out_object(shipped, coco128, 25)
    first = shipped.segment([click_point(gt)], [1]).mask
    ys, xs = np.nonzero(first)
    negative = (float(xs.max()) - 2.5, float(ys[xs.argmax()]) + 0.5)
    second = shipped.segment([click_point(gt), negative], [1, 0]).mask
    yy, xx = np.mgrid[: gt.shape[0], : gt.shape[1]]
    far = (xx + 0.5 - negative[0]) ** 2 + (yy + 0.5 - negative[1]) ** 2 > (0.5 * max(gt.shape)) ** 2
    assert not second[int(negative[1]), int(negative[0])]
    assert (first[far] != second[far]).mean() < 0.01


@pytest.mark.slow
def test_flip_averaging_makes_a_click_head_step_nearly_mirror_symmetric(coco128):
    """The mirrored view's logits are mirrored back before averaging: a mirrored image and prompts give
    nearly the mirrored mask (the crops' resampling is not exactly symmetric); one view alone gives 0.95."""
    predictor = load_predictor(flip_average=True)
    gt = _largest_held_out_object(predictor, coco128, 25)
    image = predictor.features.image
    points, positive = np.array([click_point(gt)]), np.ones(1, bool)
    previous = predictor.segment(points, [1]).mask
    step = predictor.correct(previous, points, positive).mask
    predictor.set_image(np.ascontiguousarray(image[:, ::-1]))
    mirrored_points = np.stack([image.shape[1] - points[:, 0], points[:, 1]], axis=1)
    mirrored = predictor.correct(np.ascontiguousarray(previous[:, ::-1]), mirrored_points, positive).mask
    assert mask_iou(step, mirrored[:, ::-1]) >= 0.98
