"""The click head and the predictor's corrective clicks: shapes, prompt encoding, the zoom window, the
guarantees every prompt gets, and memoised click sequences."""

import numpy as np
import pytest
import torch

from segmodels.click_head import CLICK_RADIUS, CROP, ClickHead, click_maps, crop_points, zoom_window
from segmodels.model import ModelConfig, SegmentationModel
from segmodels.predictor import MaskPredictor, honour_prompt


@pytest.fixture(scope="module")
def with_head() -> MaskPredictor:
    torch.manual_seed(0)
    return MaskPredictor(SegmentationModel(ModelConfig(click_head=True)), scales=(0.5, 1.0))


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, size=(120, 160, 3), dtype=np.uint8)


def test_the_head_maps_a_crop_and_its_prompts_to_stride_2_logits():
    head = ClickHead({"s2": 16, "s4": 24, "s8": 32, "s16": 96}).eval()
    taps = {
        t: torch.zeros(2, c, CROP // s, CROP // s)
        for t, c, s in (("s2", 16, 2), ("s4", 24, 4), ("s8", 32, 8), ("s16", 96, 16))
    }
    assert head(taps, torch.zeros(2, 3, CROP, CROP)).shape == (2, CROP // 2, CROP // 2)


def test_click_maps_put_positive_and_negative_disks_in_their_own_channels():
    maps = click_maps(np.array([[20.5, 30.5], [100.5, 50.5]]), np.array([1, 0]))
    assert maps[0, 30, 20] == 1 and maps[1, 30, 20] == 0
    assert maps[1, 50, 100] == 1 and maps[0, 50, 100] == 0
    assert maps[0].sum() == pytest.approx(np.pi * CLICK_RADIUS**2, rel=0.25)


def test_the_zoom_window_covers_the_mask_and_every_click():
    centre, scale = zoom_window(np.array([100.0, 50, 200, 100]), np.array([[250.0, 75]]))
    corners = crop_points(np.array([[100.0, 50], [250, 100]]), centre, scale)
    assert (corners >= 0).all() and (corners <= CROP).all()
    assert centre == (175.0, 75.0)


def test_the_zoom_window_of_a_lone_click_has_a_minimum_size():
    centre, scale = zoom_window(None, np.array([[40.0, 40]]))
    assert centre == (40.0, 40.0) and CROP / scale > 48


def test_positives_are_always_inside_and_negatives_always_outside(with_head, image):
    with_head.set_image(image)
    points = [[30, 30], [60, 40], [90, 80], [40, 90]]
    result = with_head.segment(points, [1, 0, 1, 0])
    for (x, y), label in zip(points, [1, 0, 1, 0], strict=True):
        assert result.mask[y, x] == bool(label)


def test_honouring_a_prompt_clears_everything_outside_its_box():
    mask = honour_prompt(
        np.ones((50, 50), bool), np.zeros((0, 2)), np.zeros((0, 2)), np.array([10, 10, 20, 20])
    )
    assert mask[15, 15] and not mask[30, 30] and not mask[5, 5]


def test_a_click_sequence_continues_from_the_memoised_previous_prompt(with_head, image):
    with_head.set_image(image)
    steps = []
    original = with_head.correct

    def counted(*args, **kwargs):
        steps.append(1)
        return original(*args, **kwargs)

    with_head.correct = counted
    try:
        with_head.segment([[50, 50]], [1])
        before = len(steps)
        incremental = with_head.segment([[50, 50], [80, 60]], [1, 0]).mask
        assert len(steps) - before == 1
        with_head.set_image(image)
        assert np.array_equal(with_head.segment([[50, 50], [80, 60]], [1, 0]).mask, incremental)
    finally:
        del with_head.correct


def test_a_checkpoint_with_a_click_head_round_trips(tmp_path):
    from segmodels.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig(click_head=True), pretrained_trunk=False)
    save_checkpoint(model, tmp_path)
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["config"]["click_head"] and loaded.click_head is not None
    for key, value in model.click_head.state_dict().items():
        torch.testing.assert_close(loaded.click_head.state_dict()[key], value)


@pytest.mark.slow
def test_segmask_train_clicks_writes_a_checkpoint_with_a_trained_click_head(coco128, tmp_path):
    from segmodels.checkpoint import load_checkpoint
    from segmodels.predictor import DEFAULT_CHECKPOINT
    from segmodels.train_clicks import ClickTrainConfig, train_click_head

    config = ClickTrainConfig(
        str(coco128), str(DEFAULT_CHECKPOINT), str(tmp_path / "out"), split="tune", steps=2, batch_size=2
    )
    model, meta = load_checkpoint(train_click_head(config))
    assert model.click_head is not None and meta["stages"][-1] == "clicks"
    assert meta["training"]["clicks"]["steps"] == 2 and len(meta["training"]["clicks"]["loss_every_100"]) == 1


def _half_found_episode() -> tuple:
    from segmodels.train_clicks import Episode

    target = np.zeros((CROP, CROP), bool)
    target[40:150, 40:150] = True
    probability = np.zeros((CROP, CROP), np.float32)
    probability[40:150, 40:95] = 0.8  # the left half found, the right half missed
    return Episode(target, [(60.0, 90.0)], [1], np.zeros((CROP, CROP), np.float32)), probability


def test_a_simulated_round_adds_the_annotators_click_in_the_missed_part():
    from segmodels.train_clicks import ClickTrainConfig, feed_back

    episode, probability = _half_found_episode()
    feed_back(episode, probability, ClickTrainConfig("", "", ""))
    assert episode.labels == [1, 1] and episode.points[1][0] > 95  # positive, in the right half
    np.testing.assert_array_equal(episode.previous, probability)


def test_a_first_click_round_feeds_the_prediction_back_without_adding_a_click():
    from segmodels.train_clicks import ClickTrainConfig, feed_back

    episode, probability = _half_found_episode()
    feed_back(episode, probability, ClickTrainConfig("", "", "", corrections=False))
    assert episode.points == [(60.0, 90.0)] and episode.labels == [1]
    np.testing.assert_array_equal(episode.previous, probability)


def test_a_training_crop_framed_as_a_first_click_is_zoomed_on_a_window_like_mask_holding_the_click(coco128):
    from segmodels.data import CocoInstances
    from segmodels.geometry import mask_to_box
    from segmodels.train_clicks import ClickSampler

    sampler = ClickSampler(CocoInstances(coco128, "fit"), 32.0**2, 0.0, seed=0, window_probability=1.0)
    for _ in range(12):
        sample = sampler.sample()
        assert sample.previous is not None and sample.click is not None
        col, row = int(sample.click[0]), int(sample.click[1])
        assert sample.previous[row - 1 : row + 2, col - 1 : col + 2].any()
        assert sample.target[row - 1 : row + 2, col - 1 : col + 2].any()
        x0, y0, x1, y1 = mask_to_box(sample.previous)
        assert max(x1 - x0, y1 - y0) <= 0.67 * CROP + 2  # the zoom window of that mask


def test_a_pasted_instance_never_hides_a_framed_crops_click(coco128):
    from segmodels.data import CocoInstances
    from segmodels.train_clicks import ClickSampler

    sampler = ClickSampler(CocoInstances(coco128, "fit"), 32.0**2, 1.0, seed=0, window_probability=1.0)
    for _ in range(40):
        sample = sampler.sample()
        col, row = int(sample.click[0]), int(sample.click[1])
        assert sample.target[row - 1 : row + 2, col - 1 : col + 2].any()


def test_a_window_like_mask_is_a_part_of_the_object_or_the_object_grown(coco128):
    from segmodels.data import CocoInstances
    from segmodels.train_clicks import ClickSampler

    dataset = CocoInstances(coco128, "fit")
    sampler = ClickSampler(dataset, 32.0**2, 0.0, seed=1)
    inst = sampler.instances[0]
    full = dataset.mask(inst)
    kinds = set()
    for _ in range(30):
        like = sampler.window_like_mask(full, sampler.first_click(full), inst)
        part, grown = not (like & ~full).any(), not (full & ~like).any()
        assert like.any() and (part or grown)
        kinds.add("part" if part else "grown")
    assert kinds == {"part", "grown"}


def test_a_first_click_head_takes_the_first_clicks_steps_and_the_click_head_the_corrections(image):
    torch.manual_seed(0)
    config = ModelConfig(click_head=True, first_click_head=True)
    predictor = MaskPredictor(SegmentationModel(config), scales=(0.5, 1.0))
    calls = []
    for name in ("click_head", "first_click_head"):
        getattr(predictor.model, name).register_forward_hook(lambda *_, name=name: calls.append(name))
    predictor.set_image(image)
    predictor.segment([[50, 50]], [1])
    assert calls == ["first_click_head"] * predictor.first_click_steps
    calls.clear()
    predictor.segment([[50, 50], [80, 60]], [1, 0])
    predictor.segment(box=[20, 20, 100, 90])
    assert set(calls) == {"click_head"}


def test_a_predictor_told_not_to_use_the_first_click_head_leaves_the_callers_model_its_head(image):
    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig(click_head=True, first_click_head=True))
    predictor = MaskPredictor(model, scales=(0.5, 1.0), first_click_head=False)
    calls = []
    predictor.model.click_head.register_forward_hook(lambda *_: calls.append("click_head"))
    predictor.set_image(image)
    predictor.segment([[50, 50]], [1])
    assert calls == ["click_head"] * predictor.first_click_steps
    assert predictor.model.first_click_head is None and model.first_click_head is not None


def test_a_checkpoint_with_a_first_click_head_round_trips(tmp_path):
    from segmodels.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig(click_head=True, first_click_head=True), pretrained_trunk=False)
    save_checkpoint(model, tmp_path)
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["config"]["first_click_head"] and loaded.first_click_head is not None
    for key, value in model.first_click_head.state_dict().items():
        torch.testing.assert_close(loaded.first_click_head.state_dict()[key], value)
