"""Trunks, DeepMask and SharpMask: shapes, weights, and dense == per-window computation."""

from pathlib import Path

import pytest
import torch

from segmodels.backbones import TAPS, _load_verified_state_dict, build_trunk, fold_batchnorm
from segmodels.deepmask import CELLS, INPUT, MASK_SIZE, WINDOW
from segmodels.model import ModelConfig, SegmentationModel
from segmodels.sharpmask import window_skips

# Beyond this many pixels the trunk's zero padding no longer reaches the window's features (checked by the
# tests below: equality is exact, so a too-small margin fails them).
CONTEXT_MARGIN = 256


@pytest.fixture(scope="module")
def model() -> SegmentationModel:
    torch.manual_seed(0)
    return SegmentationModel(ModelConfig()).eval()


def test_mobilenet_taps_have_strides_2_4_8_16(model):
    taps = model.trunk(torch.rand(1, 3, 96, 128))
    assert [tuple(taps[t].shape[-2:]) for t in TAPS] == [(48, 64), (24, 32), (12, 16), (6, 8)]
    assert {t: taps[t].shape[1] for t in TAPS} == model.trunk.tap_channels


def test_resnet50_taps_have_strides_2_4_8_16_without_weights():
    trunk = build_trunk("resnet50", pretrained=False).eval()
    taps = trunk(torch.rand(1, 3, 64, 64))
    assert [taps[t].shape[-1] for t in TAPS] == [32, 16, 8, 4]
    assert taps["s16"].shape[1] == 1024


def test_imagenet_weights_are_loaded_not_random():
    a, b = build_trunk("mobilenet_v2"), build_trunk("mobilenet_v2")
    assert torch.equal(a.stages[0][0][0].weight, b.stages[0][0][0].weight)


def test_weight_file_with_wrong_checksum_is_refused(tmp_path: Path):
    path = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="sha256"):
        _load_verified_state_dict(path, "b03531047ffa")


def test_folding_batchnorm_keeps_the_trunk_output():
    trunk = build_trunk("mobilenet_v2").eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        before = trunk(x)
        after = fold_batchnorm(trunk)(x)
    for t in TAPS:
        torch.testing.assert_close(after[t], before[t], atol=1e-4, rtol=1e-4)


def test_training_forward_gives_one_window(model):
    masks, scores, emb = model.deepmask(model.trunk(torch.rand(2, 3, INPUT, INPUT))["s16"])
    assert masks.shape == (2, MASK_SIZE, MASK_SIZE) and scores.shape == (2,) and emb.shape == (2, 512)


def test_dense_heads_equal_heads_on_the_window_features(model):
    with torch.no_grad():
        f16 = model.trunk(torch.rand(1, 3, 320, 352))["s16"]
        dense = model.deepmask.embedding(f16)
        i, j = 3, 5
        window = model.deepmask.embedding(f16[:, :, i : i + CELLS + 2, j : j + CELLS + 2])
    torch.testing.assert_close(window[0, :, 0, 0], dense[0, :, i, j], atol=1e-5, rtol=1e-5)


def _crop_with_context(image: torch.Tensor, i: int, j: int) -> torch.Tensor:
    y, x = 16 * i - CONTEXT_MARGIN, 16 * j - CONTEXT_MARGIN
    return image[:, :, y : y + INPUT + 2 * CONTEXT_MARGIN, x : x + INPUT + 2 * CONTEXT_MARGIN]


def test_dense_output_equals_forward_pass_on_the_corresponding_crop(model):
    """The 192 px window crop, with enough surrounding context that the trunk's padding does not reach it."""
    torch.manual_seed(1)
    image = torch.rand(1, 3, 1024, 1056)
    i, j = 20, 21
    cells = CONTEXT_MARGIN // 16
    with torch.no_grad():
        emb = model.deepmask.embedding(model.trunk(image)["s16"])
        f16 = model.trunk(_crop_with_context(image, i, j))["s16"][
            :, :, cells : cells + CELLS + 2, cells : cells + CELLS + 2
        ]
        mask, score, vec = model.deepmask(f16)
        dense_mask = model.deepmask.mask(emb[:, :, i, j])
        dense_score = model.deepmask.score(emb)[0, i, j]
    torch.testing.assert_close(vec[0], emb[0, :, i, j], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mask, dense_mask, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(score[0], dense_score, atol=1e-4, rtol=1e-4)


def test_dense_refinement_equals_refinement_on_the_corresponding_crop(model):
    torch.manual_seed(2)
    image = torch.rand(1, 3, 960, 992)
    i, j = 18, 19
    cells = CONTEXT_MARGIN // 16
    with torch.no_grad():
        taps = model.trunk(image)
        emb = model.deepmask.embedding(taps["s16"])
        dense = model.sharpmask(
            emb[:, :, i, j], window_skips(taps, torch.tensor([0]), torch.tensor([i]), torch.tensor([j]))
        )
        crop_taps = model.trunk(_crop_with_context(image, i, j))
        crop_emb = model.deepmask.embedding(crop_taps["s16"])[:, :, cells, cells]
        skips = window_skips(crop_taps, torch.tensor([0]), torch.tensor([cells]), torch.tensor([cells]))
        crop = model.sharpmask(crop_emb, skips)
    assert dense.shape == (1, WINDOW, WINDOW)
    torch.testing.assert_close(crop, dense, atol=1e-4, rtol=1e-4)


def test_window_skips_cover_the_central_160_pixels_of_a_192_crop(model):
    taps = model.trunk(torch.rand(2, 3, INPUT, INPUT))
    zero = torch.zeros(2, dtype=torch.long)
    skips = window_skips(taps, torch.arange(2), zero, zero)
    assert {t: tuple(v.shape[-2:]) for t, v in skips.items()} == {
        "s16": (10, 10),
        "s8": (20, 20),
        "s4": (40, 40),
        "s2": (80, 80),
    }
    torch.testing.assert_close(skips["s8"][1], taps["s8"][1, :, 2:22, 2:22])
