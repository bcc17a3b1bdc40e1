"""GrabCut as the box prompt's last step: it grows or trims a mask to the colour boundary inside the box."""

import cv2
import numpy as np

from segmodels.geometry import mask_iou
from segmodels.grabcut_refine import refine_in_box


def disk(height: int, width: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    return (cols + 0.5 - centre[0]) ** 2 + (rows + 0.5 - centre[1]) ** 2 <= radius**2


def textured_scene(object_mask: np.ndarray) -> np.ndarray:
    """A reddish object on a bluish background, both with noise."""
    rng = np.random.default_rng(0)
    image = rng.normal(0, 12, size=(*object_mask.shape, 3))
    image += np.where(object_mask[..., None], [200, 60, 50], [40, 90, 190])
    return np.clip(image, 0, 255).astype(np.uint8)


TRUTH = disk(200, 240, (120, 100), 50)
IMAGE = textured_scene(TRUTH)
BOX = np.array([70.0, 50.0, 170.0, 150.0])


def test_a_mask_that_holds_part_of_the_object_grows_to_its_colour_boundary():
    part = disk(200, 240, (120, 100), 30)
    refined = refine_in_box(IMAGE, part, BOX)
    assert mask_iou(part, TRUTH) < 0.4
    assert mask_iou(refined, TRUTH) > 0.9


def test_a_boundary_that_spills_onto_the_background_is_trimmed():
    spill = disk(200, 240, (120, 100), 54)  # a band of background around the object, within SURE_DEPTH
    refined = refine_in_box(IMAGE, spill, np.array([60.0, 40.0, 180.0, 160.0]))
    assert mask_iou(spill, TRUTH) < 0.87
    assert mask_iou(refined, TRUTH) > 0.95


def test_the_result_holds_only_pixels_inside_the_box_and_keeps_the_sure_interior():
    spill = disk(200, 240, (120, 100), 30) | disk(200, 240, (175, 100), 12)  # crosses the box's right side
    refined = refine_in_box(IMAGE, spill, BOX, max_side=32)
    outside = np.ones_like(spill)
    outside[50:150, 70:170] = False
    assert not refined[outside].any()
    assert refined[disk(200, 240, (120, 100), 30 - 5)].all()


def test_a_box_without_a_pixel_of_the_image_leaves_the_mask_as_it_was():
    part = disk(200, 240, (120, 100), 30)
    assert np.array_equal(refine_in_box(IMAGE, part, np.array([250.0, 0.0, 400.0, 100.0])), part)


def test_a_mask_without_an_interior_is_returned_as_it_was():
    thin = np.zeros_like(TRUTH)
    thin[100:103, 80:160] = True
    assert np.array_equal(refine_in_box(IMAGE, thin, BOX), thin)
    empty = np.zeros_like(TRUTH)
    assert not refine_in_box(IMAGE, empty, BOX).any()


def test_a_large_box_is_refined_on_a_smaller_crop_with_the_same_outcome():
    truth = disk(600, 800, (400, 300), 200)
    image = textured_scene(truth)
    part = disk(600, 800, (400, 300), 130)
    refined = refine_in_box(image, part, np.array([190.0, 90.0, 610.0, 510.0]), max_side=128)
    assert refined.shape == truth.shape
    assert mask_iou(refined, truth) > 0.9


def test_the_same_box_gives_the_same_mask_whatever_ran_before():
    noise = np.random.default_rng(1).integers(0, 256, size=(200, 240, 3), dtype=np.uint8)
    part = disk(200, 240, (120, 100), 30)
    first = refine_in_box(noise, part, BOX)
    for seed in range(5):  # OpenCV's random generator moves on between the calls
        cv2.setRNGSeed(seed)
        cv2.randu(np.zeros((100, 100), np.float32), 0, 1)
        assert np.array_equal(refine_in_box(noise, part, BOX), first)
