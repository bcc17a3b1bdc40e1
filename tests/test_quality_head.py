"""The quality head: shapes, checkpoints with and without it, the first click's ranking by its predicted IoU,
the shipped head on held-out objects, and ``segmask train quality``."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from segmodels.annotator import click_point
from segmodels.checkpoint import load_checkpoint, save_checkpoint
from segmodels.checkpoint_files import METADATA_FILE
from segmodels.data import CocoInstances
from segmodels.model import ModelConfig, SegmentationModel
from segmodels.predictor import MaskPredictor, load_predictor
from segmodels.quality_head import FEATURES, QualityHead, window_features
from segmodels.train_quality import click_samples

SCALE = FEATURES.index("log2_scale")


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, size=(120, 160, 3), dtype=np.uint8)


def test_the_head_maps_embeddings_and_features_to_an_iou_per_window():
    head = QualityHead().eval()
    iou = head(torch.randn(5, 512), torch.randn(5, len(FEATURES)))
    assert iou.shape == (5,) and ((iou >= 0) & (iou <= 1)).all()


def test_window_features_describe_the_click_and_the_coarse_mask():
    logits = np.full((56, 56), -5.0, np.float32)
    logits[14:42, 14:42] = 5.0
    box = np.array([0.0, 0.0, 112.0, 112.0])
    features = window_features(logits, box, np.array([56.0, 56.0]), 0.5, 1.5, (224, 448), 0.0)
    named = dict(zip(FEATURES, features.tolist(), strict=True))
    assert features.shape == (len(FEATURES),) and features.dtype == np.float32
    assert named["click_x"] == named["click_y"] == 0.0
    assert named["log2_scale"] == -1.0 and named["log2_window_share"] == pytest.approx(np.log2(0.25))
    assert named["inside_image"] == 1.0 and named["objectness"] == 1.5
    assert named["click_probability"] > 0.99 and named["area_share"] == pytest.approx(0.25)
    assert named["border_share"] == 0.0 and named["component_share"] == 1.0
    assert named["centroid_x"] == pytest.approx(0.0, abs=1e-6)


def test_a_checkpoint_with_a_quality_head_round_trips(tmp_path):
    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig(quality_head=True), pretrained_trunk=False)
    model.quality_head.standardise(torch.randn(8, 512), torch.randn(8, len(FEATURES)))
    save_checkpoint(model, tmp_path)
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["config"]["quality_head"] and loaded.quality_head is not None
    for key, value in model.quality_head.state_dict().items():
        torch.testing.assert_close(loaded.quality_head.state_dict()[key], value)


def test_a_checkpoint_from_before_the_quality_head_still_loads(tmp_path):
    save_checkpoint(SegmentationModel(ModelConfig(), pretrained_trunk=False), tmp_path)
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    del meta["config"]["quality_head"]
    (tmp_path / METADATA_FILE).write_text(json.dumps(meta))
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.quality_head is None


class PrefersScale(nn.Module):
    """A stand-in head whose predicted IoU grows (``sign`` 1) or shrinks (-1) with the window's scale."""

    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign = sign

    def forward(self, embeddings: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        assert embeddings.shape == (len(features), 512) and features.shape[1] == len(FEATURES)
        return torch.sigmoid(self.sign * features[:, SCALE])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_first_click_takes_the_window_the_quality_head_prefers(image, sign):
    torch.manual_seed(0)
    predictor = MaskPredictor(SegmentationModel(ModelConfig(quality_head=True)), scales=(0.5, 1.0))
    predictor.model.quality_head = PrefersScale(sign)
    # Every window holds the click: the head's preference alone decides.
    predictor.threshold_logit = -1e9
    predictor.set_image(image)
    point = np.array([[80.0, 60.0]])
    windows = predictor.point_windows(point, None)
    sides = [w.box[2] - w.box[0] for w in windows]
    assert sides[0] == (min(sides) if sign > 0 else max(sides))
    assert windows[0].quality == max(w.quality for w in windows)
    chosen = predictor.click_prompt_mask(point[0]).mask
    assert np.array_equal(chosen, predictor.window_mask(windows[0]).mask)


def test_without_a_quality_head_windows_are_ranked_by_objectness(image):
    torch.manual_seed(0)
    predictor = MaskPredictor(SegmentationModel(ModelConfig()), scales=(0.5, 1.0))
    predictor.set_image(image)
    assert all(w.quality is None for w in predictor.point_windows(np.array([[80.0, 60.0]]), None))


@pytest.mark.slow
def _ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


@pytest.mark.slow
@pytest.mark.parametrize("image_id", [25, 400, 450])
def test_the_shipped_head_ranks_whole_objects_above_fragments(coco128, image_id):
    """On the largest object of a held-out image, the head's first choice among a click's 28 windows is
    within 0.05 IoU of the best one, and its predictions order the windows like their true IoU."""
    val = CocoInstances(coco128, "val")
    index = next(i for i, im in enumerate(val.images) if im["id"] == image_id)
    predictor = load_predictor()
    predictor.set_image(val.image(index))
    gt = val.mask(max(val.instances_by_image[index], key=lambda inst: inst.area))
    embeddings, features, iou = click_samples(predictor, np.array(click_point(gt)), gt)
    with torch.no_grad():
        predicted = predictor.model.quality_head(embeddings, features).numpy()
    assert iou[predicted.argmax()] >= iou.max() - 0.05
    assert np.corrcoef(_ranks(predicted), _ranks(iou))[0, 1] > 0.6


def test_segmask_train_quality_writes_a_checkpoint_that_loads(coco128, tmp_path):
    from backend.cli import build_parser, run_train
    from segmodels.predictor import DEFAULT_CHECKPOINT, load_predictor

    args = build_parser().parse_args(
        ["train", "quality", "--data", str(coco128), "--init", str(DEFAULT_CHECKPOINT)]
        + ["--out", str(tmp_path / "out"), "--split", "fit", "--max-images", "2", "--steps", "3"]
        + ["--device", "cpu"]
    )
    run_train(args)
    model, meta = load_checkpoint(tmp_path / "out")
    assert model.quality_head is not None and meta["stages"][-1] == "quality"
    record = meta["training"]["quality"]
    assert record["steps"] == 3 and record["max_images"] == 2 and record["clicks"] > 0
    predictor = load_predictor(tmp_path / "out")
    predictor.set_image(np.full((96, 128, 3), 120, np.uint8))
    assert predictor.segment([[64, 48]], [1]).mask.shape == (96, 128)
