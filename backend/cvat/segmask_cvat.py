"""cvat-sdk auto-annotation detection function: DeepMask + SharpMask proposals labelled by MultiPathNet.

Run it on a task of any CVAT edition (the model runs on this machine; see backend/cvat/README.md)::

    cvat-cli --server-host https://app.cvat.ai --auth USER task auto-annotate TASK_ID \\
        --function-file backend/cvat/segmask_cvat.py [--conf-threshold 0.6] [--conv-mask-to-poly]

``spec`` declares the model's classes as mask labels (label id = class index); CVAT matches them to the
task's labels by exact name. For tasks whose label names differ, set ``SEGMASK_CVAT_LABELS`` before running,
e.g. ``SEGMASK_CVAT_LABELS="Vehicle=car,truck,bus;Person;Dog"``: the function then declares exactly those
labels and maps the model's classes onto them the way the Label Studio backend does (a label's listed
classes first, then a case-insensitive name match); other classes are dropped.

The model is loaded once, on the first image (``SEGMASK_MODEL_DIR``, default the shipped model;
``SEGMASK_DEVICE``, default auto).
"""

from __future__ import annotations

import logging
import os

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image

from backend.cvat.runtime import LABELS_ENV, label_plan, model_classes, shared_segmenter, shared_settings
from backend.cvat.shapes import sdk_detection_shapes

log = logging.getLogger(__name__)

_plan = label_plan(model_classes(shared_settings().model_dir), os.environ.get(LABELS_ENV, ""))

spec = cvataa.DetectionFunctionSpec(
    labels=[cvataa.label_spec(name, i, type="mask") for i, name in enumerate(_plan.names)]
)


def detect(context: cvataa.DetectionFunctionContext, image: PIL.Image.Image) -> list:
    """Masks (or, with ``context.conv_mask_to_poly``, polygons) of the objects in ``image`` scoring at least
    ``context.conf_threshold`` (None: ``SEGMASK_SCORE_THRESHOLD``, 0.5)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    detections = shared_segmenter().detect(pixels, context.conf_threshold)
    shapes = sdk_detection_shapes(detections, _plan.class_ids, context.conv_mask_to_poly)
    log.info("%s: %d objects, %d shapes", context.frame_name, len(detections), len(shapes))
    return shapes
