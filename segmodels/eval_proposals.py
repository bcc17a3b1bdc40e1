"""Proposal quality: class-agnostic AR@10/100/1000 (coco_scoring.py, ``segm`` and ``bbox``) of the top-k
windows of ``MaskPredictor.propose`` on each image, against all of the images' annotations (crowd flags as
COCO). Masks are ``bool (H, W)``; COCO boxes ``[x, y, w, h]`` pixels.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from tqdm import tqdm

from segmodels.coco_scoring import average_recall, coco_ground_truth
from segmodels.data import CocoInstances
from segmodels.geometry import mask_to_rle
from segmodels.predictor import Mask, MaskPredictor

PROPOSAL_IMAGES = 3
TOP_PROPOSALS = 10


def proposal_results(
    image_id: int, proposals: Sequence[Mask], category_id: int
) -> tuple[list[dict], list[dict]]:
    """COCO result entries of one image's proposals: ``segm`` (RLE) and ``bbox`` (xywh of the mask's box).

    ``category_id`` is any GT category: the evaluation is class-agnostic.
    """
    segm, bbox = [], []
    for p in proposals:
        x1, y1, x2, y2 = (float(v) for v in p.box)
        common = {"image_id": image_id, "category_id": category_id, "score": float(p.score)}
        segm.append({**common, "segmentation": mask_to_rle(p.mask)})
        bbox.append({**common, "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return segm, bbox


def evaluate_proposals(
    predictor: MaskPredictor, dataset: CocoInstances, image_indices: Sequence[int], k: int
) -> tuple[dict, dict[int, list[tuple[dict, float]]]]:
    """AR of the top-``k`` proposals of each image (``set_image`` + ``propose(k)``, refined when the
    checkpoint has SharpMask). Returns the metrics and, for the first :data:`PROPOSAL_IMAGES` images with
    instances, their top :data:`TOP_PROPOSALS` proposals as ``(RLE, score)`` keyed by image index."""
    category_id = min(dataset.categories)
    segm: list[dict] = []
    bbox: list[dict] = []
    seconds: list[float] = []
    examples: dict[int, list[tuple[dict, float]]] = {}
    empty = 0
    for index in tqdm(image_indices, desc="proposals", unit="image", dynamic_ncols=True):
        image_id = dataset.images[index]["id"]
        start = time.perf_counter()
        predictor.set_image(dataset.image(index))
        proposals = predictor.propose(k=k)
        seconds.append(time.perf_counter() - start)
        empty += sum(not p.mask.any() for p in proposals)
        image_segm, image_bbox = proposal_results(image_id, proposals, category_id)
        segm += image_segm
        bbox += image_bbox
        if len(examples) < PROPOSAL_IMAGES and dataset.instances_by_image[index]:
            examples[index] = [(r["segmentation"], r["score"]) for r in image_segm[:TOP_PROPOSALS]]
    metrics = {
        "k": k,
        "images": len(image_indices),
        "empty_masks": empty,
        "median_seconds_per_image": statistics.median(seconds),
        **average_recall(coco_ground_truth(dataset, image_indices), segm, bbox),
    }
    return metrics, examples
