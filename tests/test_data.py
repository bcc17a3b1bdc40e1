"""The window-sampling protocol (docs/papers.md) and the fixed split."""

import math

import numpy as np
import pytest

from segmodels.data import CocoInstances, WindowSampler, crop_mask
from segmodels.deepmask import CONTEXT, OBJECT, WINDOW
from segmodels.splits import in_split


@pytest.fixture(scope="module")
def train(coco128):
    return CocoInstances(coco128, "train")


def test_split_holds_out_image_ids_divisible_by_five(coco128):
    val, train = CocoInstances(coco128, "val"), CocoInstances(coco128, "train")
    val_ids, train_ids = {im["id"] for im in val.images}, {im["id"] for im in train.images}
    assert not val_ids & train_ids
    assert len(val_ids) + len(train_ids) == len(CocoInstances(coco128, "all").images) == 104
    assert all(i % 5 == 0 for i in val_ids) and len(val_ids) == 21


@pytest.mark.parametrize(("tune", "fit", "fold"), [("tune", "fit", 1), ("tune2", "fit2", 2)])
def test_each_tuning_fold_and_its_fit_split_partition_the_train_images(tune, fit, fold):
    train_ids = [i for i in range(1, 200) if in_split(i, "train")]
    tune_ids = {i for i in train_ids if in_split(i, tune)}
    fit_ids = {i for i in train_ids if in_split(i, fit)}
    assert not tune_ids & fit_ids and tune_ids | fit_ids == set(train_ids)
    assert all(i % 5 == fold for i in tune_ids)
    assert not any(in_split(i, tune) or in_split(i, fit) for i in range(0, 200, 5))


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        in_split(5, "test")


def test_instances_exclude_crowd_and_tiny_annotations(train):
    kept = {inst.annotation_id for inst in train.instances}
    for ann in train.annotations:
        if ann["iscrowd"] or ann["area"] < 100:
            assert ann["id"] not in kept


def _target_box(target: np.ndarray):
    ys, xs = np.nonzero(target)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_mask_samples_are_centred_at_canonical_scale(train):
    """Targets of objects fully inside the window: centre within the +-16 px shift, size 92 px +-1/4 octave
    (with slack: COCO boxes and rasterised polygons differ by a pixel, magnified by the scale)."""
    sampler = WindowSampler(train, seed=3, augment=False)
    checked = 0
    for _ in range(200):
        image, target = sampler.mask_sample()
        assert image.shape == (192, 192, 3) and image.dtype == np.uint8
        assert target.shape == (WINDOW, WINDOW) and set(np.unique(target)) <= {0.0, 1.0}
        if (
            not target.any()
            or target[0].any()
            or target[-1].any()
            or target[:, 0].any()
            or target[:, -1].any()
        ):
            continue  # objects cut by the image or window border have a smaller visible extent
        x0, y0, x1, y1 = _target_box(target)
        assert abs((x0 + x1) / 2 - WINDOW / 2) <= 16 + 6 and abs((y0 + y1) / 2 - WINDOW / 2) <= 16 + 6
        size = max(x1 - x0, y1 - y0)
        checked += 1
        assert OBJECT * 2**-0.25 - 6 <= size <= OBJECT * 2**0.25 + 6
    assert checked > 100


def test_score_samples_are_balanced(train):
    sampler = WindowSampler(train, seed=4)
    labels = [sampler.score_sample()[1] for _ in range(600)]
    assert 0.44 <= np.mean(labels) <= 0.56


def test_negative_windows_have_no_centred_object_at_canonical_scale(train):
    sampler = WindowSampler(train, seed=5)
    for _ in range(200):
        image_index, centre, scale = sampler._negative_window()
        for inst in train.instances_by_image[image_index]:
            offset = scale * math.dist(inst.centre, centre)
            octaves = abs(math.log2(scale * inst.size / OBJECT))
            assert offset >= 48 or octaves >= 1


def test_mask_sampling_is_uniform_over_categories_not_instances(train):
    sampler = WindowSampler(train, seed=6)
    draws = [sampler._random_instance().category_id for _ in range(4000)]
    person = train.instances_by_category[1]
    share_of_instances = len(person) / len(train.instances)
    assert np.mean(np.array(draws) == 1) < share_of_instances / 3
    assert len(set(draws)) == len(train.instances_by_category)


def test_batches_are_float_tensors_in_unit_range(train):
    x, y = WindowSampler(train, seed=7).mask_batch(4)
    assert x.shape == (4, 3, 192, 192) and y.shape == (4, 160, 160)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_sampling_is_reproducible_from_the_seed(train):
    a, b = WindowSampler(train, seed=8).mask_batch(3), WindowSampler(train, seed=8).mask_batch(3)
    assert all(np.array_equal(p.numpy(), q.numpy()) for p, q in zip(a, b, strict=True))


def _object_near_centre(target: np.ndarray) -> bool:
    """Whether the target has object pixels within the 16 px shift of the window's centre."""
    c = WINDOW // 2
    return bool(target[c - 17 : c + 17, c - 17 : c + 17].any())


def test_click_centred_windows_hold_the_clicked_object_at_their_centre(train):
    """Centred on an interior click (shifted by at most 16 px), a window always has its object near the
    centre; centred on the box centre, a curved or hollow object can lie wholly away from it."""
    clicked = WindowSampler(train, seed=9, augment=False, click_centred=1.0)
    boxed = WindowSampler(train, seed=9, augment=False)
    assert all(_object_near_centre(clicked.mask_sample()[1]) for _ in range(300))
    assert not all(_object_near_centre(boxed.mask_sample()[1]) for _ in range(300))


def test_click_centred_share_must_be_a_share(train):
    with pytest.raises(ValueError, match="click_centred"):
        WindowSampler(train, click_centred=1.5)


def test_instance_sampling_draws_evaluated_instances_uniformly(train):
    sampler = WindowSampler(train, seed=10, mask_sampling="instance")
    draws = [sampler._random_masked_instance() for _ in range(4000)]
    assert all(inst.has_mask and inst.area >= 32**2 for inst in draws)
    person = [i for i in sampler.evaluated if i.category_id == 1]
    share = np.mean([inst.category_id == 1 for inst in draws])
    assert abs(share - len(person) / len(sampler.evaluated)) < 0.04


def test_unknown_mask_sampling_is_refused(train):
    with pytest.raises(ValueError, match="mask_sampling"):
        WindowSampler(train, mask_sampling="image")


def test_copy_paste_hides_part_of_the_target_under_another_object(train):
    """A pasted instance replaces the pixels it covers and takes them out of the target, never more than
    half of it; the rest of the window and of the target are unchanged."""
    plain = WindowSampler(train, seed=11, augment=False)
    pasting = WindowSampler(train, seed=12, augment=False, paste_probability=1.0)
    hid_some = False
    for _ in range(40):
        inst = plain._random_masked_instance()
        centre, scale = plain._jittered(inst, 0.0)
        image = plain._input(inst.image_index, centre, scale, False)
        target = crop_mask(train.mask_u8(inst), centre, scale, False)
        before_image, before_target = image.copy(), target.copy()
        pasting._paste(image, target, inst)
        lost = (before_target > 0) & (target == 0)
        assert not ((target > 0) & (before_target == 0)).any()
        assert target.sum() >= before_target.sum() / 2
        changed = (image != before_image).any(axis=2)[CONTEXT : CONTEXT + WINDOW, CONTEXT : CONTEXT + WINDOW]
        assert (lost & changed).sum() >= 0.95 * lost.sum()  # pasted pixels may equal the old ones
        hid_some |= bool(lost.any())
    assert hid_some


def test_no_copy_paste_keeps_the_papers_samples(train):
    a = WindowSampler(train, seed=13).mask_batch(3)
    b = WindowSampler(train, seed=13, paste_probability=0.0).mask_batch(3)
    assert all(np.array_equal(p.numpy(), q.numpy()) for p, q in zip(a, b, strict=True))


def test_paste_probability_must_be_a_probability(train):
    with pytest.raises(ValueError, match="paste_probability"):
        WindowSampler(train, paste_probability=-0.1)
