import json

import numpy as np
import pytest
from shapes import disc, rectangle

from segmodels.geometry import (
    box_iou_xyxy,
    coco_segmentation_to_mask,
    mask_iou,
    mask_to_box,
    mask_to_polygon,
    mask_to_polygons,
    mask_to_rle,
    masks_iou_matrix,
    polygon_to_mask,
    polygons_to_mask,
    rle_to_mask,
)


def l_shape() -> np.ndarray:
    mask = rectangle(120, 120, 10, 10, 40, 110)
    mask[80:110, 10:100] = True
    return mask


def thin_bar() -> np.ndarray:
    return rectangle(64, 128, 5, 30, 120, 32)


def two_blobs() -> np.ndarray:
    return disc(100, 200, 50, 50, 30) | disc(100, 200, 150, 50, 20)


def tiny_blob() -> np.ndarray:
    return rectangle(10, 10, 4, 4, 7, 7)


def round_trip_iou(mask: np.ndarray) -> float:
    return mask_iou(polygons_to_mask(mask_to_polygons(mask), *mask.shape), mask)


@pytest.mark.parametrize(
    "mask",
    [
        disc(256, 256, 128, 128, 100),
        disc(32, 32, 16, 16, 6),
        rectangle(100, 100, 20, 30, 80, 70),
        l_shape(),
        thin_bar(),
        two_blobs(),
        tiny_blob(),
        rectangle(50, 60, 0, 0, 60, 50),
    ],
    ids=["big_disc", "small_disc", "rectangle", "l_shape", "thin_bar", "two_blobs", "tiny_3x3", "full_image"],
)
def test_mask_to_polygons_round_trip_keeps_iou_at_least_min_iou(mask):
    assert round_trip_iou(mask) >= 0.95


def test_polygons_are_float32_xy_arrays():
    (polygon,) = mask_to_polygons(rectangle(100, 100, 20, 30, 80, 70))
    assert polygon.dtype == np.float32
    assert polygon.ndim == 2 and polygon.shape[1] == 2


def test_rectangle_polygon_is_its_four_pixel_edge_corners():
    polygon = mask_to_polygon(rectangle(100, 100, 20, 30, 80, 70))
    corners = {tuple(p) for p in polygon.tolist()}
    assert corners == {(20.0, 30.0), (80.0, 30.0), (80.0, 70.0), (20.0, 70.0)}


def test_large_rectangle_simplifies_to_few_vertices():
    assert 4 <= len(mask_to_polygon(rectangle(400, 400, 50, 60, 350, 330))) <= 6


def test_disc_200_px_wide_gets_few_vertices():
    assert len(mask_to_polygon(disc(256, 256, 128, 128, 100))) <= 60


def test_higher_min_iou_keeps_more_vertices():
    mask = disc(256, 256, 128, 128, 100)
    assert len(mask_to_polygon(mask, min_iou=0.99)) > len(mask_to_polygon(mask, min_iou=0.9))


def test_two_separate_blobs_give_two_polygons_largest_first():
    mask = two_blobs()
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    areas = [polygon_to_mask(p, *mask.shape).sum() for p in polygons]
    assert areas[0] > areas[1]


def test_small_separate_parts_are_dropped():
    mask = disc(100, 200, 50, 50, 30) | rectangle(100, 200, 150, 50, 155, 55)
    assert len(mask_to_polygons(mask)) == 1


def test_number_of_parts_is_capped_by_max_parts():
    mask = np.zeros((20, 100), dtype=bool)
    mask[5:15, 0:100:10] = True  # ten equal bars
    assert len(mask_to_polygons(mask, max_parts=3)) == 3


def test_parts_one_pixel_apart_stay_separate():
    mask = rectangle(20, 20, 2, 2, 8, 18) | rectangle(20, 20, 9, 2, 15, 18)
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    assert not polygons_to_mask(polygons, 20, 20)[:, 8].any()


def test_holes_are_filled_by_the_outer_polygon():
    mask = disc(100, 100, 50, 50, 40) & ~disc(100, 100, 50, 50, 10)
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 1
    assert polygons_to_mask(polygons, 100, 100)[50, 50]


def test_mask_to_polygon_returns_the_largest_part():
    polygon = mask_to_polygon(two_blobs())
    assert polygon_to_mask(polygon, 100, 200)[50, 50]
    assert not polygon_to_mask(polygon, 100, 200)[50, 150]


def test_empty_mask_gives_no_polygons():
    empty = np.zeros((10, 10), dtype=bool)
    assert mask_to_polygons(empty) == []
    assert mask_to_polygon(empty) is None


def test_polygon_to_mask_covers_pixels_whose_centres_are_inside():
    expected = rectangle(12, 12, 2, 3, 7, 9)
    assert np.array_equal(polygon_to_mask([[2, 3], [7, 3], [7, 9], [2, 9]], 12, 12), expected)
    assert np.array_equal(polygon_to_mask([[2.4, 3.4], [6.6, 3.4], [6.6, 8.6], [2.4, 8.6]], 12, 12), expected)


def test_polygon_to_mask_accepts_flat_coco_lists_and_arrays_alike():
    flat = [1.0, 1.0, 9.0, 2.0, 5.0, 9.0]
    assert np.array_equal(polygon_to_mask(flat, 10, 10), polygon_to_mask(np.reshape(flat, (-1, 2)), 10, 10))


def test_polygon_with_fewer_than_three_vertices_is_empty():
    assert not polygon_to_mask([[1, 1], [8, 8]], 10, 10).any()


def test_polygons_to_mask_is_the_union_of_polygons():
    a, b = [[0, 0], [4, 0], [4, 4], [0, 4]], [[6, 6], [10, 6], [10, 10], [6, 10]]
    expected = rectangle(10, 10, 0, 0, 4, 4) | rectangle(10, 10, 6, 6, 10, 10)
    assert np.array_equal(polygons_to_mask([a, b], 10, 10), expected)


def test_mask_iou_of_overlapping_rectangles():
    assert mask_iou(rectangle(10, 10, 0, 0, 4, 10), rectangle(10, 10, 2, 0, 6, 10)) == pytest.approx(20 / 60)


def test_mask_iou_of_two_empty_masks_is_zero():
    empty = np.zeros((5, 5), dtype=bool)
    assert mask_iou(empty, empty) == 0.0


def test_masks_iou_matrix_matches_pairwise_mask_iou():
    rng = np.random.default_rng(0)
    a = rng.random((3, 16, 16)) > 0.5
    b = np.concatenate([rng.random((3, 16, 16)) > 0.5, np.zeros((1, 16, 16), dtype=bool)])
    a[2] = False
    expected = np.array([[mask_iou(x, y) for y in b] for x in a])
    matrix = masks_iou_matrix(a, b)
    assert matrix.shape == (3, 4)
    np.testing.assert_allclose(matrix, expected, rtol=1e-6)


def test_mask_to_box_has_exclusive_right_and_bottom_edges():
    box = mask_to_box(rectangle(20, 20, 0, 3, 10, 7))
    assert box.dtype == np.float32
    assert box.tolist() == [0.0, 3.0, 10.0, 7.0]


def test_mask_to_box_of_empty_mask_is_zeros():
    assert mask_to_box(np.zeros((5, 5), dtype=bool)).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_box_iou_xyxy_of_overlapping_disjoint_and_degenerate_boxes():
    assert box_iou_xyxy([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou_xyxy(np.array([0.0, 0, 10, 10]), np.array([0.0, 0, 10, 10])) == 1.0
    assert box_iou_xyxy([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou_xyxy([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0


def test_rle_round_trip_is_exact_and_json_serialisable():
    mask = two_blobs() ^ rectangle(100, 200, 0, 40, 200, 60)
    rle = json.loads(json.dumps(mask_to_rle(mask)))
    assert rle["size"] == [100, 200]
    assert np.array_equal(rle_to_mask(rle), mask)


def test_rle_to_mask_accepts_bytes_counts():
    rle = mask_to_rle(l_shape())
    assert np.array_equal(rle_to_mask({**rle, "counts": rle["counts"].encode()}), l_shape())


def test_rle_to_mask_accepts_uncompressed_counts():
    # Column-major runs starting with background: 3 rows x 2 columns, only pixel (row 1, column 0) set.
    mask = rle_to_mask({"size": [3, 2], "counts": [1, 1, 4]})
    assert np.array_equal(mask, np.array([[False, False], [True, False], [False, False]]))


def test_coco_segmentation_to_mask_unions_polygon_lists():
    segmentation = [[0, 0, 4, 0, 4, 4, 0, 4], [6, 6, 10, 6, 10, 10, 6, 10]]
    assert coco_segmentation_to_mask(segmentation, 10, 10).sum() == 32


@pytest.fixture(scope="module")
def coco_masks(coco128):
    """(annotation, mask) pairs of COCO128, decoded once for the real-data tests."""
    data = json.loads((coco128 / "instances.json").read_text())
    sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
    return [
        (ann, coco_segmentation_to_mask(ann["segmentation"], *sizes[ann["image_id"]]))
        for ann in data["annotations"]
    ]


def test_coco_polygon_masks_match_annotated_area(coco_masks):
    # `area` is the polygon's own area, so below ~100 px the half-pixel rasterisation dominates the error.
    ratios = [
        mask.sum() / ann["area"] for ann, mask in coco_masks if not ann["iscrowd"] and ann["area"] >= 100
    ]
    assert ratios
    np.testing.assert_allclose(ratios, 1.0, atol=0.1)


def test_coco_crowd_rle_masks_decode_to_their_runs_and_box(coco_masks):
    crowds = [(ann, mask) for ann, mask in coco_masks if ann["iscrowd"]]
    assert crowds, "COCO128 has crowd annotations (8 in data/coco128)"
    for ann, mask in crowds:
        # The `area` of COCO crowd annotations does not follow their RLE (ratios 0.66-0.99 in COCO128), so
        # check the pixel count against the foreground runs and the extent against the annotated box.
        assert mask.sum() == sum(ann["segmentation"]["counts"][1::2])
        x, y, w, h = ann["bbox"]
        np.testing.assert_allclose(mask_to_box(mask), [x, y, x + w, y + h], atol=1.0)


def test_coco_instance_masks_round_trip_through_polygons(coco_masks):
    # Observed on COCO128 (442 instances): median 12 vertices per instance, median IoU 0.956, 96.2% >= 0.95;
    # the misses are multi-part objects whose small parts are dropped (all parts kept: IoU >= 0.95).
    ious = []
    for ann, mask in coco_masks:
        if not ann["iscrowd"] and ann["area"] > 32 * 32:
            ious.append(mask_iou(polygons_to_mask(mask_to_polygons(mask), *mask.shape), mask))
    assert len(ious) > 100
    assert np.mean(np.array(ious) >= 0.95) >= 0.95
