"""The simulated annotator (RITM protocol) on synthetic masks."""

import numpy as np
import pytest
from shapes import disc, rectangle

from segmodels.annotator import click_point, next_click


def depth(mask: np.ndarray) -> np.ndarray:
    """Brute force: distance of each pixel centre to the nearest background pixel centre (outside counts)."""
    padded = np.pad(mask, 1)
    bg = np.argwhere(~padded)
    out = np.zeros(mask.shape)
    for r, c in np.argwhere(mask):
        out[r, c] = np.sqrt(((bg - (r + 1, c + 1)) ** 2).sum(1)).min()
    return out


def test_click_point_is_the_centre_of_a_disc():
    assert click_point(disc(40, 50, 20.5, 15.5, 8)) == (20.5, 15.5)


def test_click_point_is_deepest_interior_point_with_the_image_border_as_boundary():
    mask = rectangle(30, 40, 0, 0, 12, 30) | rectangle(30, 40, 0, 20, 40, 30)  # an L touching three borders
    x, y = click_point(mask)
    col, row = int(x), int(y)
    assert (x - col, y - row) == (0.5, 0.5) and mask[row, col]
    d = depth(mask)
    assert d[row, col] == pytest.approx(d.max(), abs=1e-3)


def test_a_missed_part_gets_a_positive_click_at_its_deepest_point():
    gt = rectangle(60, 60, 5, 5, 55, 55)
    pred = gt.copy()
    pred[10:30, 10:30] = False  # a 20 px square missed
    pred[0:3, 0:3] = True  # 9 px spurious
    (x, y), label = next_click(pred, gt)
    assert label == 1
    assert 10 <= x <= 30 and 10 <= y <= 30 and (x, y) == click_point(gt & ~pred)


def test_a_spurious_part_gets_a_negative_click_inside_it():
    gt = rectangle(60, 60, 20, 20, 40, 40)
    pred = gt | rectangle(60, 60, 0, 45, 30, 60)  # a 15 px band spurious
    pred[25:28, 25:28] = False  # 3 px missed
    (x, y), label = next_click(pred, gt)
    assert label == 0
    assert pred[int(y), int(x)] and not gt[int(y), int(x)] and y > 45


def test_the_deeper_error_region_wins_not_the_larger_one():
    gt = rectangle(80, 80, 0, 0, 80, 40)
    pred = gt.copy()
    pred[0:2, :] = False  # 160 px missed, but a thin strip (depth 1)
    pred |= disc(80, 80, 40, 60, 6)  # ~113 px spurious, depth 6
    (x, y), label = next_click(pred, gt)
    assert label == 0 and abs(x - 40) <= 1 and abs(y - 60) <= 1


def test_no_click_for_a_perfect_mask():
    gt = disc(40, 40, 20, 20, 10)
    assert next_click(gt.copy(), gt) is None
