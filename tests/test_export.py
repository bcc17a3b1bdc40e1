"""segmodels.export: COCO results and files that pycocotools reads, overlays, and ``segmask predict``'s
file handling. Detections are built from COCO128's GT masks (deterministic, no model needed)."""

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from backend.cli import build_parser
from segmodels.data import CocoInstances
from segmodels.export import (
    checkpoint_categories,
    detections_to_coco,
    draw_detections,
    predict_files,
    write_coco,
)
from segmodels.geometry import mask_to_box, rle_to_mask
from segmodels.predictor import PREANNOTATION_MAX, PREANNOTATION_THRESHOLD, Detection, load_predictor


def quiet_coco(path: Path | None = None) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path)) if path else COCO()


@pytest.fixture(scope="module")
def dataset(coco128) -> CocoInstances:
    return CocoInstances(coco128, "all")


def gt_detections(dataset: CocoInstances, index: int) -> list[Detection]:
    """The image's instances as detections, scores falling from 0.9 in annotation order."""
    out = []
    for n, inst in enumerate(dataset.instances_by_image[index]):
        mask = dataset.mask(inst)
        out.append(
            Detection(
                dataset.categories[inst.category_id],
                inst.category_id,
                0.9 - 0.01 * n,
                mask,
                mask_to_box(mask),
            )
        )
    return out


def image_with_instances(dataset: CocoInstances, at_least: int = 2) -> int:
    return next(i for i in range(len(dataset)) if len(dataset.instances_by_image[i]) >= at_least)


def test_detections_to_coco_load_as_results_of_the_ground_truth(coco128, dataset):
    index = image_with_instances(dataset)
    image_id = dataset.images[index]["id"]
    detections = gt_detections(dataset, index)
    results = detections_to_coco(detections, image_id)
    assert len(results) == len(detections)
    for r, d in zip(results, detections, strict=True):
        assert set(r) == {"image_id", "category_id", "segmentation", "bbox", "score"}
        assert (
            r["image_id"] == image_id
            and r["category_id"] == d.class_id
            and r["score"] == pytest.approx(d.score)
        )
        assert isinstance(r["segmentation"]["counts"], str)
        assert np.array_equal(rle_to_mask(r["segmentation"]), d.mask)
        x1, y1, x2, y2 = d.box
        assert r["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    results = json.loads(json.dumps(results))  # plain JSON types only
    gt = quiet_coco(coco128 / "instances.json")
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = gt.loadRes(results)
    assert len(loaded.getAnnIds(imgIds=[image_id])) == len(detections)
    assert sorted(loaded.getCatIds()) == sorted(gt.getCatIds())


def test_detections_to_coco_clips_boxes_to_the_image():
    mask = np.zeros((20, 30), bool)
    mask[5:15, 20:30] = True
    detection = Detection("thing", 7, 0.5, mask, np.array([18.0, -4.0, 41.0, 15.0]))
    (result,) = detections_to_coco([detection], 3)
    assert result["bbox"] == pytest.approx([18.0, 0.0, 12.0, 15.0])
    assert detections_to_coco([], 3) == []


def test_write_coco_writes_a_file_pycocotools_loads(tmp_path, dataset):
    indices = [i for i in range(len(dataset)) if dataset.instances_by_image[i]][:2]
    images, results = [], []
    for image_id, index in enumerate(indices, start=1):
        info = dataset.images[index]
        images.append(
            {"id": image_id, "file_name": info["file_name"], "width": info["width"], "height": info["height"]}
        )
        results += detections_to_coco(gt_detections(dataset, index), image_id)
    ids = sorted(dataset.categories)
    categories = checkpoint_categories([dataset.categories[i] for i in ids], ids)
    path = write_coco(tmp_path / "sub" / "predictions.json", images, categories, results)
    assert not [p for p in path.parent.iterdir() if p.name != "predictions.json"]  # no temporary left
    coco = quiet_coco(path)
    assert sorted(coco.getImgIds()) == [1, 2]
    assert len(coco.getCatIds()) == len(ids)
    anns = coco.loadAnns(coco.getAnnIds())
    assert [a["id"] for a in anns] == list(range(1, len(results) + 1))
    for ann, result in zip(anns, results, strict=True):
        assert ann["iscrowd"] == 0 and ann["score"] == pytest.approx(result["score"])
        assert ann["area"] == rle_to_mask(result["segmentation"]).sum()
        assert np.array_equal(coco.annToMask(ann).astype(bool), rle_to_mask(result["segmentation"]))


def test_draw_detections_paints_the_masks_and_nothing_else(dataset):
    index = image_with_instances(dataset)
    image = dataset.image(index)
    before = image.copy()
    detections = gt_detections(dataset, index)
    drawn = draw_detections(image, detections, boxes=False, text=False)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert np.array_equal(image, before)  # the input is not modified
    union = np.any([d.mask for d in detections], axis=0)
    changed = np.any(drawn != image, axis=2)
    assert changed[union].mean() > 0.9
    # Outside the masks only the outlines (drawn on the mask edges, a pixel or two wide) may change.
    far = cv2.dilate(union.astype(np.uint8), np.ones((7, 7), np.uint8)) == 0
    assert not changed[far].any()
    full = draw_detections(image, detections)
    assert full.shape == image.shape and np.any(full != drawn)  # boxes and labels add pixels
    assert np.array_equal(draw_detections(image, []), image)


def test_draw_detections_rejects_a_mask_of_another_size(dataset):
    image = np.zeros((10, 12, 3), np.uint8)
    bad = Detection("x", 1, 0.5, np.ones((12, 10), bool), np.array([0.0, 0.0, 10.0, 12.0]))
    with pytest.raises(ValueError, match="does not match"):
        draw_detections(image, [bad])


@pytest.mark.slow
def test_predict_files_writes_coco_files_and_overlays_and_skips_unreadable_files(tmp_path, dataset, capsys):
    indices = [i for i in range(len(dataset)) if len(dataset.instances_by_image[i]) >= 2][:2]
    paths = [dataset.image_path(indices[0]), tmp_path / "broken.jpg", tmp_path / "missing.png"]
    paths.append(dataset.image_path(indices[1]))
    paths[1].write_text("not an image")
    out = tmp_path / "out"
    summary = predict_files(
        load_predictor(), paths, out, score_threshold=0.0, max_detections=5, progress=False
    )
    assert [p for p, _ in summary.failed] == [str(paths[1]), str(paths[2])]
    assert summary.images == 2
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "missing.png" in captured.err
    assert f"{paths[0]}: " in captured.out
    coco = quiet_coco(out / "predictions.json")
    images = coco.loadImgs(coco.getImgIds())
    assert [im["id"] for im in images] == [1, 2]
    assert [im["file_name"] for im in images] == [str(paths[0]), str(paths[3])]
    assert (images[0]["height"], images[0]["width"]) == dataset.image(indices[0]).shape[:2]
    results = json.loads((out / "results.json").read_text())
    assert len(results) == summary.detections == len(coco.getAnnIds()) == 10
    for path, index in ((paths[0], indices[0]), (paths[3], indices[1])):
        overlay = cv2.imread(str(out / f"{Path(path).stem}.png"))
        assert overlay is not None and overlay.shape == dataset.image(index).shape


def test_predict_command_line_defaults_are_pre_annotations():
    args = build_parser().parse_args(["predict", "a.jpg", "b.png"])
    assert args.images == [Path("a.jpg"), Path("b.png")]
    assert args.out == Path("predictions") and args.checkpoint is None
    assert (args.score_threshold, args.max_detections) == (PREANNOTATION_THRESHOLD, PREANNOTATION_MAX)
