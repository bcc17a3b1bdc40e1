"""Calibrated detection probabilities (segmodels.calibration) on synthetic data; the checkpoint plumbing."""

import json

import numpy as np
import pytest
import torch

from segmodels.calibration import (
    FEATURES,
    Calibration,
    candidate_features,
    fit_isotonic,
    fit_logistic,
    log_loss,
    reliability,
)
from segmodels.checkpoint import save_checkpoint
from segmodels.checkpoint_files import read_metadata
from segmodels.data import CocoInstances
from segmodels.eval_detection import greedy_matches
from segmodels.fit_calibration import MODELS, calibrate, write_calibration
from segmodels.model import ModelConfig, SegmentationModel
from segmodels.predictor import DEFAULT_CHECKPOINT, MaskPredictor, load_predictor


def _synthetic(n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features ``(n, F)`` and labels drawn with a known probability: sigmoid(2 * objectness - 1)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES)))
    truth = 1 / (1 + np.exp(-(2 * x[:, 0] - 1)))
    return x, (rng.random(n) < truth).astype(float), truth


def test_logistic_fit_recovers_the_true_probability():
    x, y, truth = _synthetic()
    model = fit_logistic(x, y, ("objectness", "class_logit"))
    assert np.abs(model.probability(x) - truth).max() < 0.05


def test_isotonic_fit_is_monotone_and_matches_the_rate_of_each_step():
    values = np.repeat([0.0, 1.0, 2.0], 100)
    labels = np.concatenate([np.zeros(100), np.r_[np.ones(30), np.zeros(70)], np.ones(100)])
    x = np.zeros((300, len(FEATURES)))
    x[:, FEATURES.index("class_logit")] = values
    model = fit_isotonic(x, labels, "class_logit")
    p = model.probability(x)
    assert p[::100] == pytest.approx([0.0, 0.3, 1.0])
    assert np.all(np.diff(model.knots_y) >= 0)


def test_isotonic_fit_pools_a_decreasing_pair():
    x = np.zeros((4, len(FEATURES)))
    x[:, 0] = [0, 1, 2, 3]
    model = fit_isotonic(x, np.array([0.0, 1.0, 0.0, 1.0]), "objectness")
    assert model.probability(x) == pytest.approx([0.0, 0.5, 0.5, 1.0])


@pytest.mark.parametrize("kind", ["logistic", "isotonic"])
def test_a_calibration_survives_json_with_the_same_probabilities(kind):
    x, y, _ = _synthetic(2000)
    model = fit_logistic(x, y, FEATURES) if kind == "logistic" else fit_isotonic(x, y, "objectness")
    again = Calibration.from_json(json.loads(json.dumps(model.to_json())))
    assert np.array_equal(again.probability(x), model.probability(x))


def test_unknown_kinds_and_features_are_refused():
    with pytest.raises(ValueError, match="kind"):
        Calibration.from_json({"kind": "forest", "features": ["objectness"]})
    with pytest.raises(ValueError, match="features"):
        Calibration.from_json({"kind": "logistic", "features": ["colour"]})


def test_class_features_ignore_the_background_probability():
    probs = np.array([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1]])
    x = candidate_features(np.array([0.9, 0.9]), np.array([0.1, 0.1]), probs)
    share = FEATURES.index("class_logit")
    assert x[0, share] == pytest.approx(x[1, share])  # 2:1 between the classes in both
    assert x[:, FEATURES.index("margin")] == pytest.approx([1 / 3, 1 / 3])


def test_the_detection_logit_is_the_uncalibrated_scores_logit():
    x = candidate_features(np.array([0.8]), np.array([0.25]), np.array([[0.5, 0.5]]))
    assert x[0, FEATURES.index("detection_logit")] == pytest.approx(np.log(4 * 0.25))


def test_perfectly_calibrated_bins_have_no_calibration_error():
    p = np.repeat([0.05, 0.55], 20)
    y = np.concatenate([np.r_[1.0, np.zeros(19)], np.r_[np.ones(11), np.zeros(9)]])
    data = reliability(p, y)
    assert data["ece"] == pytest.approx(0.0) and data["count"][0] == data["count"][5] == 20


def test_the_calibration_error_weighs_each_bins_gap_by_its_count():
    p = np.r_[np.full(30, 0.95), np.full(10, 0.15)]
    y = np.r_[np.zeros(30), np.zeros(10)]
    data = reliability(p, y)
    assert data["ece"] == pytest.approx((30 * 0.95 + 10 * 0.15) / 40)
    assert data["rate"][9] == 0.0 and data["rate"][4] is None


def test_log_loss_of_a_fair_coin_is_log_two():
    assert log_loss(np.full(4, 0.5), np.array([0, 1, 0, 1])) == pytest.approx(np.log(2))


def test_matching_is_one_to_one_best_detection_first():
    iou = np.array([[0.9, 0.6], [0.8, 0.3], [0.7, 0.7]])
    assert greedy_matches(iou, np.ones_like(iou, bool)) == [0, None, 1]
    assert greedy_matches(iou, np.array([[False, True]] * 3)) == [1, None, None]


def test_a_checkpoint_carries_its_calibration_to_the_predictor(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(SegmentationModel(ModelConfig()), tmp_path / "plain")
    x, y, _ = _synthetic(500)
    model = fit_logistic(x, y, ("objectness",))
    write_calibration(tmp_path / "plain", tmp_path / "calibrated", model)
    assert "calibration" not in read_metadata(tmp_path / "plain")
    predictor = load_predictor(tmp_path / "calibrated")
    assert predictor.calibration is not None
    assert np.array_equal(predictor.calibration.probability(x), model.probability(x))
    assert MaskPredictor(SegmentationModel(ModelConfig())).calibration is None


def test_the_shipped_checkpoint_is_calibrated_on_training_images_only():
    fit = read_metadata(DEFAULT_CHECKPOINT)["calibration"]["fit"]
    assert fit["images"] and all(image_id % 5 != 0 for image_id in fit["images"])
    assert fit["model"] in fit["cross_validation"]


@pytest.mark.slow
def test_calibrating_on_a_few_training_images_compares_every_model(coco128):
    dataset = CocoInstances(coco128, "train")
    indices = sorted(range(len(dataset)), key=lambda i: dataset.images[i]["id"])[:4]
    model = calibrate(load_predictor(), dataset, indices, proposals=20)
    assert set(model.fit["cross_validation"]) == set(MODELS) and model.fit["model"] in MODELS
    assert model.fit["images"] == [dataset.images[i]["id"] for i in indices]
    p = model.probability(np.random.default_rng(0).normal(size=(50, len(FEATURES))))
    assert np.all((p >= 0) & (p <= 1))
