"""Checkpoints round-trip through safetensors + JSON; training is seeded and resumes exactly."""

import json
import os
from pathlib import Path

import pytest
import torch

from segmodels.checkpoint import load_checkpoint, save_checkpoint
from segmodels.checkpoint_files import read_metadata
from segmodels.model import ModelConfig, SegmentationModel
from segmodels.train import train
from segmodels.train_common import TrainConfig


@pytest.fixture(scope="module")
def model() -> SegmentationModel:
    torch.manual_seed(0)
    return SegmentationModel(ModelConfig(classes=["cat", "dog"])).eval()


def test_checkpoint_round_trip_restores_every_tensor_and_the_config(model, tmp_path: Path):
    save_checkpoint(model, tmp_path, {"metrics": {"click_miou": 0.5}})
    loaded, meta = load_checkpoint(tmp_path)
    assert loaded.config == model.config and meta["metrics"] == {"click_miou": 0.5}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_compact_checkpoint_is_smaller_and_close(model, tmp_path: Path):
    save_checkpoint(model, tmp_path / "full")
    save_checkpoint(model, tmp_path / "compact", compact=True)
    full, compact = (tmp_path / d / "model.safetensors" for d in ("full", "compact"))
    assert compact.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_checkpoint(tmp_path / "compact")
    x = torch.rand(1, 3, 192, 192)
    with torch.no_grad():
        a = model.deepmask(model.trunk(x)["s16"])[0]
        b = loaded.deepmask(loaded.trunk(x)["s16"])[0]
    torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-2)


def test_checkpoint_directory_holds_no_pickle(model, tmp_path: Path):
    save_checkpoint(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]


def test_a_json_that_is_not_a_checkpoint_is_refused(tmp_path: Path):
    (tmp_path / "model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a segmask checkpoint"):
        read_metadata(tmp_path)


def _tiny(data: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        stage="deepmask",
        data=str(data),
        out=str(out),
        epochs=1,
        steps_per_epoch=4,
        batch_size=4,
        val_samples=4,
        checkpoint_every=2,
        **kw,
    )


@pytest.mark.slow
def test_training_resumed_midway_ends_with_the_same_weights(coco128, tmp_path: Path):
    train(_tiny(coco128, tmp_path / "straight"))
    assert train(_tiny(coco128, tmp_path / "resumed", stop_after_steps=2)) is None
    train(_tiny(coco128, tmp_path / "resumed"))
    a, meta = load_checkpoint(tmp_path / "straight")
    b, _ = load_checkpoint(tmp_path / "resumed")
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert meta["stages"] == ["deepmask"] and (tmp_path / "straight" / "curves.png").stat().st_size > 0


def test_checkpoint_files_get_the_permissions_of_ordinary_new_files(model, tmp_path: Path):
    save_checkpoint(model, tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert {(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {0o666 & ~umask}


@pytest.mark.slow
def test_segmask_train_records_the_split_and_the_window_sampling_it_trained_with(coco128, tmp_path: Path):
    from backend.cli import build_parser, run_train

    out = tmp_path / "sm"
    args = build_parser().parse_args(
        ["train", "deepmask", "--data", str(coco128), "--out", str(out), "--epochs", "1"]
        + ["--steps-per-epoch", "2", "--batch-size", "2", "--split", "fit"]
        + ["--click-centred", "0.5", "--mask-sampling", "instance", "--trunk-trainable-from", "none"]
        + ["--paste-probability", "0.25"]
    )
    run_train(args)
    config = read_metadata(out)["training"]["deepmask"]["config"]
    names = ("split", "click_centred", "mask_sampling", "paste_probability")
    assert tuple(config[name] for name in names) == ("fit", 0.5, "instance", 0.25)


@pytest.mark.slow
def test_segmask_train_clicks_records_its_augmentation_and_smallest_objects(coco128, tmp_path: Path):
    from backend.cli import build_parser, run_train
    from segmodels.predictor import DEFAULT_CHECKPOINT

    out = tmp_path / "clicks"
    args = build_parser().parse_args(
        ["train", "clicks", "--data", str(coco128), "--init", str(DEFAULT_CHECKPOINT), "--out", str(out)]
        + ["--steps", "1", "--split", "fit", "--paste-probability", "0", "--min-area", "100"]
        + ["--window-probability", "0.3", "--max-iterations", "1", "--no-corrections"]
    )
    run_train(args)
    record = read_metadata(out)["training"]["clicks"]
    names = ("paste_probability", "min_area", "window_probability", "max_iterations", "corrections")
    assert tuple(record[name] for name in names) == (0.0, 100.0, 0.3, 1, False)


@pytest.mark.slow
def test_segmask_train_first_click_adds_a_first_click_head_and_keeps_the_click_head(coco128, tmp_path: Path):
    from backend.cli import build_parser, run_train
    from segmodels.predictor import DEFAULT_CHECKPOINT

    out = tmp_path / "first-click"
    args = build_parser().parse_args(
        ["train", "first-click", "--data", str(coco128), "--init", str(DEFAULT_CHECKPOINT), "--out", str(out)]
        + ["--steps", "1", "--split", "fit"]
    )
    run_train(args)
    model, meta = load_checkpoint(out)
    before, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    assert model.first_click_head is not None and meta["stages"][-1] == "first-click"
    assert meta["training"]["first-click"]["window_probability"] == 0.3
    assert meta["training"]["first-click"]["corrections"] is True
    for key, value in before.click_head.state_dict().items():
        assert torch.equal(model.click_head.state_dict()[key], value)


def test_a_first_click_head_needs_a_checkpoint_with_a_click_head(coco128, tmp_path: Path):
    from segmodels.train_clicks import ClickTrainConfig, train_click_head

    save_checkpoint(SegmentationModel(ModelConfig(), pretrained_trunk=False), tmp_path / "plain")
    config = ClickTrainConfig(str(coco128), str(tmp_path / "plain"), str(tmp_path / "out"), steps=1)
    with pytest.raises(ValueError, match="no click head"):
        train_click_head(config, first_click=True)
