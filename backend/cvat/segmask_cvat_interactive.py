"""cvat-sdk interaction function for CVAT Online/Enterprise agents: clicks (and an optional box) -> one mask.

Register and serve it (see backend/cvat/README.md)::

    cvat-cli function create-native "segmask" --function-file backend/cvat/segmask_cvat_interactive.py
    cvat-cli function run-agent FUNCTION_ID --function-file backend/cvat/segmask_cvat_interactive.py

At least one positive point; any number of negative points; an optional bounding box. ``preprocess_image``
runs the trunk once per image (the agent keeps its result for further clicks on the same frame), and the
features are also cached by image content hash (``SEGMASK_FEATURE_CACHE_MB``), so a repeated click on the
same picture costs only the heads. The model works on the image downscaled to ``SEGMASK_MAX_WORK_SIDE``;
prompts and masks are in the original image's pixels.
"""

from __future__ import annotations

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image

from backend.cvat.runtime import shared_segmenter
from backend.cvat.shapes import interaction_shape
from backend.working_size import WorkingFeatures

spec = cvataa.InteractionFunctionSpec(min_pos_points=1, min_neg_points=0, min_bounding_boxes=0)


def preprocess_image(context: cvataa.InteractionFunctionContext, image: PIL.Image.Image) -> WorkingFeatures:
    """The image's trunk features at its working size (cached by content hash)."""
    return shared_segmenter().image_features(np.asarray(image.convert("RGB"), dtype=np.uint8))


def detect(
    context: cvataa.InteractionFunctionContext, pp_image: WorkingFeatures, prompts: cvataa.InteractionPrompts
) -> list[cvataa.InteractionResultShape]:
    """Exactly one mask shape for the prompts: ``pos_points``/``neg_points`` ``(x, y)`` pixels, and
    ``bounding_box`` ``((x1, y1), (x2, y2))`` pixel corners or None."""
    box = prompts.bounding_box
    mask = shared_segmenter().segment(
        pp_image,
        prompts.pos_points,
        prompts.neg_points,
        None if box is None else [*box[0], *box[1]],
    )
    return [interaction_shape(mask)]
