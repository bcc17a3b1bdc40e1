"""The trunk engines: ONNX Runtime gives PyTorch's taps and the shipped model's masks, on real COCO images."""

import numpy as np
import pytest
import torch

from segmodels.annotator import click_point
from segmodels.backbones import build_trunk, fold_batchnorm
from segmodels.data import CocoInstances, to_tensor
from segmodels.geometry import mask_iou
from segmodels.predictor import level_input, load_predictor
from segmodels.trunk_engine import OnnxRuntimeTrunk, TorchTrunk, build_trunk_engine

# Float32 kernels summing in another order: taps agree to 1e-4 of their range, masks to 99% IoU.
TAP_TOLERANCE = 1e-4
MASK_IOU = 0.99


@pytest.fixture(scope="module")
def val(coco128) -> CocoInstances:
    return CocoInstances(coco128, "val")


@pytest.fixture(scope="module")
def trunk() -> torch.nn.Module:
    return fold_batchnorm(build_trunk("mobilenet_v2").eval())


@pytest.mark.parametrize("scale", [0.25, 1.0, 1.41])
def test_onnxruntime_taps_match_pytorch_on_a_coco_image(trunk, val, scale):
    x = to_tensor([level_input(val.image(0), scale)[0]])
    with torch.no_grad():
        expected = TorchTrunk(trunk)(x)
    got = OnnxRuntimeTrunk(trunk, threads=1)(x)
    assert got.keys() == expected.keys()
    for tap, value in expected.items():
        assert got[tap].shape == value.shape
        assert (got[tap] - value).abs().max() <= TAP_TOLERANCE * value.abs().max()


def test_onnxruntime_takes_any_input_size_and_batch(trunk):
    engine = OnnxRuntimeTrunk(trunk, threads=1)
    taps = engine(torch.rand(2, 3, 96, 160))
    assert taps["s16"].shape[0] == 2 and taps["s16"].shape[2:] == (6, 10)


def test_an_unknown_engine_is_refused(trunk):
    with pytest.raises(ValueError, match="unknown trunk engine 'tensorrt'"):
        build_trunk_engine(trunk, "tensorrt", torch.device("cpu"))


def test_onnxruntime_is_refused_on_a_gpu(trunk):
    with pytest.raises(ValueError, match="runs on the CPU"):
        build_trunk_engine(trunk, "onnxruntime", torch.device("cuda"))


def test_auto_means_onnxruntime_on_a_cpu_and_pytorch_elsewhere(trunk):
    assert build_trunk_engine(trunk, "auto", torch.device("cpu")).name == "onnxruntime"
    assert build_trunk_engine(trunk, "auto", torch.device("cuda")).name == "torch"


@pytest.mark.slow
def test_the_shipped_model_gives_the_same_masks_on_either_engine(val):
    engines = {name: load_predictor(trunk_engine=name) for name in ("torch", "onnxruntime")}
    for index in range(3):
        image = val.image(index)
        gt = val.mask(max(val.instances_by_image[index], key=lambda inst: inst.area))
        ys, xs = np.nonzero(gt)
        box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        masks = {}
        for name, predictor in engines.items():
            predictor.set_image(image)
            masks[name] = [predictor.segment([click_point(gt)], [1]).mask, predictor.segment(box=box).mask]
        for torch_mask, ort_mask in zip(masks["torch"], masks["onnxruntime"], strict=True):
            assert mask_iou(torch_mask, ort_mask) >= MASK_IOU
