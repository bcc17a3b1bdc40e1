"""MultiPathNet's label head: the ImageNet class table, coverage pooling, the probability factorisation, the
L-BFGS fit, and what fine-tuning keeps of it."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from segmodels.backbones import ImageNetTail, build_imagenet_tail
from segmodels.finetune import remap_classes
from segmodels.imagenet_labels import (
    IMAGENET_CLASSES_OF,
    imagenet_classes,
    imagenet_prior,
    other_label_classes,
)
from segmodels.model import ModelConfig, SegmentationModel
from segmodels.multipathnet import LabelHead, MultiPathNet, box_coverage, fit_label_head, mask_coverage

TAP_CHANNELS = {"s2": 16, "s4": 24, "s8": 32, "s16": 96}
NAMES = ["dog", "pizza", "giraffe"]


def tiny_tail(dim: int = 8) -> ImageNetTail:
    """A stand-in tail with the real one's interface: s8 (32 ch) -> ``dim`` channels at stride 32."""
    torch.manual_seed(0)
    return ImageNetTail(nn.Conv2d(32, dim, 4, stride=4), nn.Linear(dim, 1000))


def taps_of_160px(batch: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        t: torch.randn(batch, TAP_CHANNELS[t], 160 // s, 160 // s, generator=g)
        for t, s in (("s4", 4), ("s8", 8), ("s16", 16))
    }


def test_every_table_entry_is_a_coco_category_with_valid_imagenet_indices(coco128):
    coco = json.loads((coco128 / "instances.json").read_text())
    names = {c["name"] for c in coco["categories"]}
    assert set(IMAGENET_CLASSES_OF) <= names
    for indices in IMAGENET_CLASSES_OF.values():
        assert indices and all(0 <= i < 1000 for i in indices)
        assert len(set(indices)) == len(indices)


def test_label_names_match_case_plural_and_aliases():
    assert imagenet_classes("Dogs") == imagenet_classes("dog")
    assert imagenet_classes("  Sofa ") == imagenet_classes("couch") == [831]
    assert imagenet_classes("tvmonitor") == imagenet_classes("tv")
    assert imagenet_classes("giraffe") == [] and imagenet_classes("Vehicle") == []


def test_prior_columns_mark_each_labels_imagenet_classes():
    prior = imagenet_prior(NAMES)
    assert prior.shape == (1000, 3)
    assert prior[:, 0].sum() == 118 and prior[963, 1] == 1 and prior[:, 2].sum() == 0


def test_other_label_classes_are_the_known_objects_a_label_set_does_not_claim():
    other = set(other_label_classes(["Cups", "person"]))
    assert set(imagenet_classes("elephant")) <= other and set(imagenet_classes("dog")) <= other
    assert not other & set(imagenet_classes("cup")) and not other & set(imagenet_classes("person"))
    # Labels the table does not know claim nothing; the whole table claims everything.
    assert other_label_classes(["vehicle"]) == sorted({i for c in IMAGENET_CLASSES_OF.values() for i in c})
    assert other_label_classes(list(IMAGENET_CLASSES_OF)) == []


def test_box_coverage_is_the_share_of_each_cell_inside_the_box():
    cov = box_coverage(torch.tensor([[32.0, 0.0, 80.0, 32.0]]), (2, 3))
    torch.testing.assert_close(cov[0], torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]]))


def test_mask_coverage_of_a_filled_box_equals_the_box_coverage():
    mask = np.zeros((100, 120), bool)
    mask[10:50, 20:90] = True
    # Image pixels -> trunk input: scale 1, shifted by 64 px.
    expected = box_coverage(torch.tensor([[84.0, 74.0, 154.0, 114.0]]), (6, 7))
    torch.testing.assert_close(mask_coverage([mask], (1.0, 1.0), 64, (6, 7)), expected, atol=1 / 255, rtol=0)


def test_mask_coverage_follows_the_scale_of_the_trunk_input():
    mask = np.zeros((64, 64), bool)
    mask[:32, :32] = True
    cov = mask_coverage([mask], (0.5, 0.5), 0, (1, 1))
    assert cov.shape == (1, 1, 1) and cov[0, 0, 0] == pytest.approx(0.25, abs=0.01)


def test_pooling_weights_features_by_coverage():
    head = LabelHead(tiny_tail(dim=2), NAMES)
    features = torch.tensor([[[[1.0, 3.0]], [[10.0, 30.0]]]])  # (1, D=2, 1, 2)
    pooled = head.pool(features, torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]]), torch.tensor([0, 0]))
    torch.testing.assert_close(pooled, torch.tensor([[1.0, 10.0], [2.0, 20.0]]))


def test_background_comes_from_the_towers_and_the_class_from_the_label_head():
    torch.manual_seed(0)
    head = LabelHead(tiny_tail(), NAMES)
    with torch.no_grad():
        head.linear.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
        head.prior_weight.zero_()
    with_head = MultiPathNet(TAP_CHANNELS, 3, reduce_channels=8, tower_dim=16, hidden_dim=16, label_head=head)
    without = MultiPathNet(TAP_CHANNELS, 3, reduce_channels=8, tower_dim=16, hidden_dim=16)
    towers = {k: v for k, v in with_head.state_dict().items() if not k.startswith("label_head")}
    without.load_state_dict(towers)
    boxes = torch.tensor([[10.0, 10.0, 90.0, 120.0], [40.0, 40.0, 80.0, 60.0]])
    with torch.no_grad():
        ours = with_head.eval()(taps_of_160px(), boxes)["probs"]
        towers = without.eval()(taps_of_160px(), boxes)["probs"]
    torch.testing.assert_close(ours[:, 0], towers[:, 0])
    torch.testing.assert_close(ours.sum(dim=1), torch.ones(2))
    assert (ours[:, 1:].argmax(dim=1) == 1).all()


def test_fit_learns_separable_examples():
    head = LabelHead(tiny_tail(dim=4), NAMES)
    pooled = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]).repeat(5, 1) + 0.05
    labels = torch.tensor([0, 1, 2]).repeat(5)
    fit_label_head(head, pooled, labels)
    with torch.no_grad():
        assert (head(pooled).argmax(dim=1) == labels).all()


def test_fit_stays_at_the_weights_it_starts_from_under_strong_decay():
    head = LabelHead(tiny_tail(dim=4), NAMES)
    with torch.no_grad():
        head.linear.weight.fill_(0.3)
    fit_label_head(head, torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), weight_decay=1e4)
    torch.testing.assert_close(head.linear.weight, torch.full((3, 4), 0.3), atol=1e-3, rtol=0)


def test_the_tail_stays_frozen_and_in_eval_mode():
    tail = build_imagenet_tail("mobilenet_v2")
    tail.train()
    assert not tail.training and not any(p.requires_grad for p in tail.parameters())
    assert tail(torch.zeros(1, 32, 16, 16)).shape == (1, 1280, 4, 4)


def test_remap_keeps_the_label_rows_of_known_names():
    model = SegmentationModel(ModelConfig(classes=["cat", "dog"], class_ids=[1, 2]), pretrained_trunk=False)
    with torch.no_grad():
        model.multipathnet.label_head.linear.weight[1].fill_(0.7)
        model.multipathnet.label_head.prior_weight.fill_(1.5)
    kept = remap_classes(model, ["Dog", "puppy"], [5, 6])
    head = model.multipathnet.label_head
    assert kept == ["Dog"]
    assert (head.linear.weight[0] == 0.7).all() and (head.linear.weight[1] == 0).all()
    assert head.prior_weight.item() == 1.5
    assert head.prior[:, 1].sum() == 118  # "puppy" is a dog to ImageNet


def test_checkpoints_from_before_the_label_head_load_without_one():
    assert ModelConfig.from_json({"classes": ["cat"], "class_ids": [1]}).label_head is False
    assert ModelConfig.from_json({}).label_head is True
