"""Label Studio percent coordinates <-> pixels, rotated rectangles included."""

import numpy as np
import pytest

from backend.ls_geometry import (
    percent_to_points,
    points_to_percent,
    rectangle_percent_box,
    rectangle_pixel_box,
)


def test_points_percent_conversions_invert_each_other():
    points = np.array([[0.0, 0.0], [12.5, 7.25], [640.0, 480.0]])
    percent = points_to_percent(points, 640, 480)
    np.testing.assert_allclose(percent[2], [100.0, 100.0])
    np.testing.assert_allclose(percent_to_points(percent, 640, 480), points)


def test_an_unrotated_rectangle_is_its_own_box_without_the_image_size():
    assert rectangle_percent_box(10.0, 20.0, 50.0, 25.0) == (10.0, 20.0, 60.0, 45.0)
    assert rectangle_pixel_box(10, 20, 50, 25, 0.0, 640, 480) == (64.0, 96.0, 384.0, 216.0)


def test_a_rotated_rectangle_turns_about_its_top_left_corner_in_pixels():
    # 200 x 50 px at (100, 100) px on a 400 x 200 image, 90 degrees clockwise: it hangs down from its corner.
    box = rectangle_pixel_box(25.0, 50.0, 50.0, 25.0, 90.0, 400, 200)
    assert box == pytest.approx((50.0, 100.0, 100.0, 200.0))
    assert rectangle_percent_box(25.0, 50.0, 50.0, 25.0, 90.0, (400, 200)) == pytest.approx(
        (12.5, 50.0, 25.0, 100.0)
    )


@pytest.mark.parametrize("degrees", [-170.0, -30.0, 15.0, 45.0, 90.0, 123.0])
def test_percent_and_pixel_boxes_agree_on_a_non_square_image(degrees):
    width, height = 640, 240
    x1, y1, x2, y2 = rectangle_percent_box(30.0, 35.0, 20.0, 30.0, degrees, (width, height))
    pixels = rectangle_pixel_box(30.0, 35.0, 20.0, 30.0, degrees, width, height)
    assert (x1 * width / 100, y1 * height / 100, x2 * width / 100, y2 * height / 100) == pytest.approx(pixels)
    # The image size's scale does not matter, its aspect ratio does.
    assert rectangle_percent_box(30.0, 35.0, 20.0, 30.0, degrees, (64, 24)) == pytest.approx((x1, y1, x2, y2))


def test_a_rotated_rectangle_needs_the_image_size():
    with pytest.raises(ValueError, match="image size"):
        rectangle_percent_box(10.0, 10.0, 20.0, 20.0, 30.0)
