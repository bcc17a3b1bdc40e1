"""MultiPathNet: foveal regions, skip wiring, output shapes, integral-loss targets and loss."""

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from segmodels.multipathnet import (
    BOX_CODER_WEIGHTS,
    IOU_THRESHOLDS,
    REGION_TAPS,
    REGIONS,
    MultiPathNet,
    assign_targets,
    decode_boxes,
    encode_boxes,
    foveal_boxes,
    integral_loss,
)

TAP_CHANNELS = {"s2": 16, "s4": 24, "s8": 32, "s16": 96}
NUM_CLASSES = 3


def small_taps(batch: int = 1) -> dict[str, torch.Tensor]:
    """MobileNetV2-like taps of a 160x160 trunk input."""
    g = torch.Generator().manual_seed(0)
    return {
        t: torch.randn(batch, TAP_CHANNELS[t], 160 // s, 160 // s, generator=g)
        for t, s in (("s4", 4), ("s8", 8), ("s16", 16))
    }


def small_model(**kwargs) -> MultiPathNet:
    torch.manual_seed(0)
    return MultiPathNet(TAP_CHANNELS, NUM_CLASSES, reduce_channels=8, tower_dim=16, hidden_dim=16, **kwargs)


BOXES = torch.tensor(
    [[10.0, 20.0, 60.0, 50.0], [0.0, 0.0, 160.0, 160.0], [100.0, 100.0, 104.0, 130.0], [70, 5, 90, 25]]
    + [[150.0, 150.0, 170.0, 175.0]]
)


def test_foveal_boxes_keep_the_centre_and_scale_the_sides():
    fovea = foveal_boxes(BOXES)
    assert fovea.shape == (4, len(BOXES), 4)
    centre = (BOXES[:, :2] + BOXES[:, 2:]) / 2
    sides = BOXES[:, 2:] - BOXES[:, :2]
    for region, scale in zip(fovea, (1.0, 1.5, 2.0, 4.0), strict=True):
        torch.testing.assert_close((region[:, :2] + region[:, 2:]) / 2, centre)
        torch.testing.assert_close(region[:, 2:] - region[:, :2], sides * scale)


def test_foveal_boxes_are_not_clipped_to_the_image():
    assert foveal_boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]]))[3, 0].tolist() == [-15.0, -15.0, 25.0, 25.0]


def test_skip_wiring_matches_the_original():
    # conv5 (s16) feeds every region, conv4 (s8) x1..x2, conv3 (s4) only x1.
    assert REGIONS == ("x1", "x1.5", "x2", "x4")
    assert REGION_TAPS == {
        "x1": ("s16", "s8", "s4"),
        "x1.5": ("s16", "s8"),
        "x2": ("s16", "s8"),
        "x4": ("s16",),
    }
    model = small_model()
    assert [mix.in_channels for mix in model.mix] == [96 + 32 + 24, 96 + 32, 96 + 32, 96]


def test_forward_shapes():
    model = small_model().eval()
    with torch.no_grad():
        out = model(small_taps(), BOXES)
    r, k1 = len(BOXES), NUM_CLASSES + 1
    assert len(out["logits"]) == len(IOU_THRESHOLDS)
    assert all(x.shape == (r, k1) for x in out["logits"])
    assert out["probs"].shape == (r, k1)
    assert out["deltas"].shape == (r, k1, 4)


def test_probs_rows_sum_to_one():
    model = small_model().eval()
    with torch.no_grad():
        probs = model(small_taps(), BOXES)["probs"]
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(BOXES)))


def test_boxes_per_image_list_matches_single_image_calls():
    model = small_model().eval()
    taps = small_taps(batch=2)
    with torch.no_grad():
        both = model(taps, [BOXES[:2], BOXES[2:]])["probs"]
        second = model({t: x[1:] for t, x in taps.items()}, BOXES[2:])["probs"]
    torch.testing.assert_close(both[2:], second)


def test_single_boxes_tensor_needs_a_batch_of_one():
    with pytest.raises(ValueError, match="batch 1"):
        small_model()(small_taps(batch=2), BOXES)


def test_assign_targets_fg_above_threshold_bg_between_and_ignored_below_bg_low():
    gt_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    gt_labels = torch.tensor([3, 7])
    proposals = torch.tensor(
        [
            [20.0, 20.0, 30.0, 29.0],  # IoU 0.90 with the label-7 box
            [0.0, 0.0, 10.0, 6.2],  # IoU 0.62
            [0.0, 0.0, 10.0, 3.0],  # IoU 0.30
            [0.0, 0.0, 10.0, 0.5],  # IoU 0.05
            [50.0, 50.0, 60.0, 60.0],  # no overlap
        ]
    )
    labels, matched, max_iou = assign_targets(proposals, gt_boxes, gt_labels)
    assert labels.shape == (6, 5)
    assert labels[:, 0].tolist() == [7] * 6
    assert labels[:, 1].tolist() == [3, 3, 3, 0, 0, 0]  # fg for u <= 0.60, bg for u in 0.65..0.75
    assert labels[:, 2].tolist() == [0] * 6
    assert labels[:, 3].tolist() == [-1] * 6
    assert labels[:, 4].tolist() == [-1] * 6
    assert matched[:3].tolist() == [1, 0, 0]
    torch.testing.assert_close(max_iou[:4], torch.tensor([0.9, 0.62, 0.3, 0.05]))


def test_assign_targets_uses_a_given_iou_matrix_instead_of_box_iou():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    labels, _, _ = assign_targets(boxes, boxes, torch.tensor([2]), iou=torch.tensor([[0.3]]))
    assert labels[:, 0].tolist() == [0] * 6


def test_assign_targets_without_ground_truth_ignores_everything():
    labels, matched, _ = assign_targets(BOXES, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert (labels == -1).all() and (matched == -1).all()


def test_encode_decode_round_trip():
    proposals = BOXES[:4]
    gt = proposals + torch.tensor([[3.0, -2.0, 8.0, 5.0]])
    labels = torch.tensor([1, 2, 3, 0])
    deltas = torch.zeros(4, NUM_CLASSES + 1, 4)
    deltas[torch.arange(4), labels] = encode_boxes(proposals, gt)
    torch.testing.assert_close(decode_boxes(proposals, deltas, labels), gt)


def test_encode_matches_torchvision_box_coder():
    proposals, gt = BOXES[:4], BOXES[:4] * 1.1 + 2
    expected = BoxCoder(BOX_CODER_WEIGHTS).encode_single(gt, proposals)
    torch.testing.assert_close(encode_boxes(proposals, gt), expected)


def tiny_batch(
    model: MultiPathNet,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    gt_boxes = torch.tensor([[10.0, 20.0, 60.0, 50.0], [100.0, 100.0, 104.0, 130.0]])
    gt_labels = torch.tensor([1, 3])
    background = torch.tensor([[10.0, 20.0, 60.0, 110.0]])  # IoU 0.33
    proposals = torch.cat([gt_boxes, BOXES, gt_boxes + 4.0, background])
    labels, matched, _ = assign_targets(proposals, gt_boxes, gt_labels, model.iou_thresholds)
    targets = encode_boxes(proposals, gt_boxes[matched.clamp(min=0)])
    return small_taps(), proposals, labels, targets


def test_integral_loss_is_finite_and_decreases_when_training_on_a_fixed_batch():
    model = small_model(dropout=0.0)
    taps, proposals, labels, targets = tiny_batch(model)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        out = model(taps, proposals)
        loss, parts = integral_loss(out["logits"], labels, out["deltas"], targets)
        assert torch.isfinite(loss) and parts["box"] > 0
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_integral_loss_ignores_proposals_labelled_minus_one():
    model = small_model().eval()
    taps, proposals, labels, targets = tiny_batch(model)
    ignored = (labels == -1).all(dim=0).nonzero()[0, 0]
    with torch.no_grad():
        out = model(taps, proposals)
    loss, _ = integral_loss(out["logits"], labels, out["deltas"], targets)
    changed = [x.clone() for x in out["logits"]]
    for x in changed:
        x[ignored] = torch.tensor([5.0, -3.0, 9.0, 1.0])
    changed_loss, _ = integral_loss(changed, labels, out["deltas"], targets)
    assert changed_loss == loss


def test_integral_loss_is_finite_when_every_proposal_is_ignored():
    logits = [torch.randn(3, NUM_CLASSES + 1)] * 6
    labels = torch.full((6, 3), -1)
    loss, _ = integral_loss(logits, labels, torch.zeros(3, NUM_CLASSES + 1, 4), torch.zeros(3, 4))
    assert loss == 0
