"""The small public API: ``set_image`` once, then ``segment`` (points and/or box), ``propose`` or ``detect``.

Coordinates: images ``(H, W, 3) uint8 RGB``; points ``(x, y)`` in pixels (edge coordinates, see geometry.py);
boxes ``xyxy`` in pixels; returned masks ``bool (H, W)`` of the image.

The trunk runs over a pyramid (``scales``, the papers' 2^-2.5 .. 2^0.5 by default) and what it computes is
kept in :class:`ImageFeatures`; every prompt on the same image reuses it, like SAM's image embedding.
``set_image`` runs it over every level at once; features made with ``compute_features(image, trunk=False)``
run it where a prompt first reads it (a block of a level around a first click's windows, the whole level
once a second object or a detection needs it). Each pyramid level is padded by ``PAD`` grey pixels so
windows can be centred near the border.
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from segmodels.annotator import click_point
from segmodels.backbones import fold_batchnorm
from segmodels.calibration import METADATA_KEY, Calibration, candidate_features
from segmodels.checkpoint import load_checkpoint
from segmodels.click_head import CROP, ClickHead, click_maps, crop_points, zoom_window
from segmodels.data import PAD_VALUE, crop_mask, crop_window, image_pyramid, to_tensor
from segmodels.deepmask import CELLS, INPUT, OBJECT, STRIDE, WINDOW
from segmodels.geometry import box_iou_xyxy, mask_to_box, mask_to_polygon, scale_box
from segmodels.grabcut_refine import refine_in_box
from segmodels.model import SegmentationModel
from segmodels.multipathnet import LabelHead, decode_boxes, mask_coverage
from segmodels.quality_head import window_features
from segmodels.sharpmask import window_skips
from segmodels.trunk_engine import build_trunk_engine

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "default"
PAPER_SCALES = tuple(float(2.0**e) for e in np.arange(-2.5, 0.51, 0.5))
PAD = 64
# Context (trunk-input pixels, a multiple of 16) around the windows a prompt reads when the trunk runs on
# their block of a level, not the whole level: with 96 a first click's mask matched the whole level's (IoU
# 1.0 on the 20 tune images' largest objects, bench/bench_first_clicks.py), with 64 down to 0.982, with 32
# to 0.50 (the trunk's zero padding at the block's edge).
BLOCK_MARGIN = 96
# Logit of the mask threshold used where the window ends (pixels outside it are background).
OUTSIDE_LOGIT = -30.0
# Pre-annotation defaults (detect()): show every detection more likely right than wrong. With a calibrated
# checkpoint (segmask calibrate) a score is the probability of being right, so no cap is needed (0 = none);
# without one, cap the list yourself (bench/bench_preannotation.py measured one per image worth showing).
PREANNOTATION_THRESHOLD = 0.5
PREANNOTATION_MAX = 0
# A candidate with more than this share of its mask inside a detection already kept is a part of that
# object, not another one: dropped (whole objects over fragments). Chosen by cross-validation on the training
# images (segmask calibrate's folds; 0.5, 0.7, 0.9, off): 0.7 had the best precision and recall at the default
# threshold, by a little; 0.5 also drops tight masks of an object inside a kept mask that spills over it.
FRAGMENT_SHARE = 0.7
# Interactive settings, chosen on the tune split (bench/bench_interactive.py, one run): masks from a box are
# thresholded at BOX_THRESHOLD (the original release thresholds DeepMask at 0.2; box mIoU 0.665 vs 0.628 at
# 0.5), from a click at the predictor's mask_threshold. A box's windows are tried at BOX_ZOOMS of the
# canonical scale and the mask whose tight box fits the box best is kept, the filled box when none fits by
# BOX_MIN_FIT (IoU): three zooms (0.8, 1, 1.25) and a fit of 0.7 measured 0.665 and 0.665, one zoom 0.674,
# no minimum fit 0.671 (standard error ~0.025), so the simplest is shipped. An empty mask still gives way to
# the filled box.
BOX_ZOOMS = (1.0,)
BOX_MIN_FIT = 0.0
BOX_THRESHOLD = 0.2
# Steps of the click head on a first click's window mask, and GrabCut as a box's last step: chosen on two
# tuning folds (image_id % 5 == 1 and == 2, every stage trained without the fold; bench_interactive.py).
# A second step: mIoU@1 +0.008 and +0.006 (standard errors 0.004, 0.003), NoC@85 -0.33 and -0.30. GrabCut:
# box mIoU +0.026 (0.010) and +0.050 (0.007), the clicks after it unchanged within two standard errors.
FIRST_CLICK_STEPS = 2
BOX_GRABCUT = True
# Radius (px) of the disk a positive point always gets, and a negative one always loses.
POINT_RADIUS = 2
# Masks of the prompts seen last on an image (an annotator's next click builds on the previous prompt; a
# few, for annotators working on different objects of one image). Each costs H x W bytes.
PROMPT_MEMO = 4
# What an image's trunk taps and dense window embeddings are stored as between prompts: float16 halves a
# cached image's features; every head still computes in float32 (widened where they are read).
FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class Mask:
    """One object: ``mask`` bool (H, W); ``score`` in [0, 1]: its window's objectness probability, or for a
    mask the click head made, its pixels' mean probability; polygon on demand."""

    mask: np.ndarray
    score: float

    @cached_property
    def polygon(self) -> np.ndarray | None:
        """Largest part as an editable polygon ``(N, 2)`` float32 pixel (x, y), or None for an empty mask."""
        return mask_to_polygon(self.mask)

    @cached_property
    def box(self) -> np.ndarray:
        """Tight box ``[x1, y1, x2, y2]`` float32 pixels (exclusive edges)."""
        return mask_to_box(self.mask)


@dataclass
class Detection:
    """A labelled object: ``label`` (class name), ``class_id`` (the training data's category id), ``score``
    in [0, 1] (:func:`detection_scores`), ``mask`` bool (H, W), ``box`` xyxy pixels (MultiPathNet's
    regressed box)."""

    label: str
    class_id: int
    score: float
    mask: np.ndarray
    box: np.ndarray

    @cached_property
    def polygon(self) -> np.ndarray | None:
        """Largest part as an editable polygon ``(N, 2)`` float32 pixel (x, y), or None for an empty mask."""
        return mask_to_polygon(self.mask)


@dataclass
class DetectionCandidates:
    """What one detection pass (:meth:`MaskPredictor.detection_candidates`) makes of an image: ``R``
    non-empty proposals, for a model of ``K`` classes.

    - ``masks``: ``R`` :class:`Mask` (bool ``(H, W)``; ``score`` = the window's objectness probability),
      highest objectness first;
    - ``probs (R, K+1)``: MultiPathNet's class probabilities (column 0 = background, column i =
      ``classes[i-1]``);
    - ``boxes (R, K+1, 4)``: MultiPathNet's regressed box for every class, xyxy image pixels;
    - ``scores (R,)`` in [0, 1], what :meth:`MaskPredictor.label_candidates` ranks by: the calibrated
      probability that the detection is right (mask IoU >= 0.5 with an object of its label) when the
      checkpoint has a calibration (calibration.py), else :func:`detection_scores` (``dataclasses.replace``
      them to rank by something else).
    """

    masks: list[Mask]
    probs: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def objectness(self) -> np.ndarray:
        """``(R,)`` float64: each window's objectness probability."""
        return np.array([m.score for m in self.masks])


@dataclass
class PyramidLevel:
    """One scale: the trunk taps over the whole padded level (``complete``), over the block of it that one
    prompt's windows read (``windows``: their rows and cols; ``origin``: the block's top-left stride-16
    cell), or none yet; and the DeepMask window embeddings ``(512, rows, cols)`` and objectness logits
    ``(rows, cols)`` once a full-image pass needs them all (``cells`` memoises the few a prompt needs).

    ``sx, sy``: trunk-input pixels per image pixel (the requested scale after rounding the resized size);
    ``size``: the padded trunk input's ``(height, width)`` pixels.
    Window (i, j)'s 160 px box in trunk-input pixels starts at ``(16 j + 16, 16 i + 16)``.
    """

    scale: float
    sx: float
    sy: float
    size: tuple[int, int]
    taps: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: tuple[int, int] = (0, 0)
    windows: tuple[range, range] | None = None
    embedding: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    cells: dict[tuple[int, int], tuple[torch.Tensor, float]] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        """Number of window rows and columns (the 12x12-cell head on the stride-16 map)."""
        return self.size[0] // STRIDE - CELLS - 1, self.size[1] // STRIDE - CELLS - 1

    @property
    def complete(self) -> bool:
        """Whether the taps cover the whole level."""
        return bool(self.taps) and self.windows is None

    def covers(self, rows: Sequence[int], cols: Sequence[int]) -> bool:
        """Whether the taps serve every window ``(rows[n], cols[n])``."""
        if self.windows is None:
            return bool(self.taps)
        return all(r in self.windows[0] for r in rows) and all(c in self.windows[1] for c in cols)

    def hold(
        self, taps: dict[str, torch.Tensor], origin: tuple[int, int], windows: tuple[range, range] | None
    ) -> None:
        """Keep new taps (``windows`` None: the whole level), dropping the cells memoised from the old ones.
        The taps go last: until then the level holds none, never new taps with an old origin."""
        self.taps = {}
        self.cells.clear()
        self.origin, self.windows = origin, windows
        self.taps = taps

    def window_box(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``(N, 4)`` xyxy image-pixel boxes of windows ``(rows[n], cols[n])``."""
        x0 = (STRIDE * cols + (INPUT - WINDOW) // 2 - PAD) / self.sx
        y0 = (STRIDE * rows + (INPUT - WINDOW) // 2 - PAD) / self.sy
        return np.stack([x0, y0, x0 + WINDOW / self.sx, y0 + WINDOW / self.sy], axis=1)

    def cell_of(self, x: float, y: float) -> tuple[float, float]:
        """Fractional (row, col) of the window centred on image pixel position (x, y)."""
        return (y * self.sy + PAD - INPUT / 2) / STRIDE, (x * self.sx + PAD - INPUT / 2) / STRIDE


class PromptMemo(OrderedDict):
    """The results (:class:`Mask`) of the last :data:`PROMPT_MEMO` prompts on one image, by prompt."""

    def put(self, key: tuple, result: Mask) -> None:
        self[key] = result
        self.move_to_end(key)
        while len(self) > PROMPT_MEMO:
            self.popitem(last=False)


@dataclass
class ImageFeatures:
    """Everything the heads need for one image (~50 MB for 640x480 after the trunk, half that with float16
    features: size an LRU cache by :attr:`nbytes`)."""

    image: np.ndarray
    levels: list[PyramidLevel] = field(default_factory=list)
    prompt_masks: PromptMemo = field(default_factory=PromptMemo)

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held now: the image and its pyramid, every level's tensors (trunk taps, dense heads,
        memoised cells) and the memoised prompt masks. It grows as prompts and detections add to it. Memory
        shared by several arrays (the pyramid's first level is the image; memoised cells are views of one
        block) counts once."""
        held: dict[tuple[str, int], int] = {}
        for level in self.levels:
            tensors = [*level.taps.values(), *(vec for vec, _ in level.cells.values())]
            tensors += [t for t in (level.embedding, level.scores) if t is not None]
            for tensor in tensors:
                storage = tensor.untyped_storage()
                held[(str(storage.device), storage.data_ptr())] = storage.nbytes()
        masks = [m.mask for m in self.prompt_masks.values()]
        for array in [self.image, *self.__dict__.get("pyramid", ()), *masks]:
            held[("numpy", array.__array_interface__["data"][0])] = array.nbytes
        return sum(held.values())

    @cached_property
    def pyramid(self) -> list[np.ndarray]:
        return image_pyramid(self.image)


@dataclass
class Candidate:
    """A dense window: pyramid level, cell (row, col) and objectness logit."""

    level: int
    row: int
    col: int
    objectness: float


@dataclass
class WindowMask:
    """Mask logits ``(S, S)`` over a window ``box`` (xyxy image pixels), with its objectness logit and, for a
    first click's windows with a quality head, the predicted IoU of its mask with the clicked object."""

    box: np.ndarray
    logits: np.ndarray
    objectness: float
    quality: float | None = None


def level_geometry(height: int, width: int, scale: float) -> tuple[int, int, int, int]:
    """The ``(rw, rh)`` size an image of ``height x width`` is resized to at ``scale``, and the ``(pw, ph)``
    size of that level padded by :data:`PAD` (more on the right/bottom up to a multiple of 16, and at least
    one 192 px window)."""
    rw, rh = max(1, round(width * scale)), max(1, round(height * scale))
    pw = -(-max(rw + 2 * PAD, INPUT) // STRIDE) * STRIDE
    ph = -(-max(rh + 2 * PAD, INPUT) // STRIDE) * STRIDE
    return rw, rh, pw, ph


def level_input(image: np.ndarray, scale: float) -> tuple[np.ndarray, float, float]:
    """``image`` resized by ``scale`` and padded by :data:`PAD` grey pixels (:func:`level_geometry`):
    ``(Hp, Wp, 3) uint8``, and the actual x/y scales."""
    h, w = image.shape[:2]
    rw, rh, pw, ph = level_geometry(h, w, scale)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (rw, rh), interpolation=interp)
    padded = cv2.copyMakeBorder(
        resized, PAD, ph - rh - PAD, PAD, pw - rw - PAD, cv2.BORDER_CONSTANT, value=PAD_VALUE
    )
    return padded, rw / w, rh / h


def paste_window(logits: np.ndarray, box: np.ndarray, height: int, width: int) -> tuple[np.ndarray, tuple]:
    """Resample ``(S, S)`` window logits onto the image pixels its ``box`` (xyxy image pixels) covers.

    Returns the logits of the clipped region and its ``(y0, y1, x0, x1)`` slice bounds in the image.
    """
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), np.float32), (0, 0, 0, 0)
    s = logits.shape[0]
    kx, ky = s / (box[2] - box[0]), s / (box[3] - box[1])
    # Inverse map from region pixel index d to window sample index: image centre x0 + d + 0.5.
    m = np.array([[kx, 0, (x0 + 0.5 - box[0]) * kx - 0.5], [0, ky, (y0 + 0.5 - box[1]) * ky - 0.5]])
    region = cv2.warpAffine(
        logits.astype(np.float32),
        m,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=OUTSIDE_LOGIT,
    )
    return region, (y0, y1, x0, x1)


def sample_window(logits: np.ndarray, box: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Window logits at image points ``(N, 2)`` (nearest sample; ``OUTSIDE_LOGIT`` outside the window)."""
    s = logits.shape[0]
    u = np.floor((points[:, 0] - box[0]) / (box[2] - box[0]) * s).astype(int)
    v = np.floor((points[:, 1] - box[1]) / (box[3] - box[1]) * s).astype(int)
    inside = (u >= 0) & (u < s) & (v >= 0) & (v < s)
    out = np.full(len(points), OUTSIDE_LOGIT, np.float32)
    out[inside] = logits[v[inside], u[inside]]
    return out


def _mask_box_fit(mask: np.ndarray, box: np.ndarray) -> float:
    """IoU of ``mask``'s tight box with ``box`` (xyxy pixels); -1 for an empty mask."""
    return box_iou_xyxy(mask_to_box(mask), box) if mask.any() else -1.0


def _logit_box(logits: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """Image-pixel xyxy box of the positive window logits, or None when the window mask is empty."""
    ys, xs = np.nonzero(logits > 0)
    if len(xs) == 0:
        return None
    s = logits.shape[0]
    w, h = box[2] - box[0], box[3] - box[1]
    return np.array(
        [
            box[0] + xs.min() / s * w,
            box[1] + ys.min() / s * h,
            box[0] + (xs.max() + 1) / s * w,
            box[1] + (ys.max() + 1) / s * h,
        ]
    )


@contextmanager
def _stage(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    """Record the wall time of the block, in ms, as ``timings[name]`` (nothing when ``timings`` is None)."""
    start = time.perf_counter()
    yield
    if timings is not None:
        timings[name] = (time.perf_counter() - start) * 1e3


class MaskPredictor:
    """DeepMask proposals refined by SharpMask, with a prompt-driven choice of window for interactive use.

    The predictor works on its own copy of ``model`` (the caller's is left as it was): the copy's trunk
    BatchNorm is folded into the convolutions and it is switched to channels-last. SharpMask refines masks
    when the checkpoint metadata lists that stage. ``trunk_engine`` (:data:`segmodels.trunk_engine.ENGINES`)
    says what runs the trunk: PyTorch (the default), ONNX Runtime (CPU; same taps to float32 rounding, about
    twice as fast) or ``auto`` (ONNX Runtime on a CPU, PyTorch elsewhere); ``trunk_threads`` are ONNX
    Runtime's intra-op threads (default: PyTorch's at construction). ``feature_dtype``
    (:data:`FEATURE_DTYPES`) is what an image's trunk taps are kept as. ``flip_average`` runs the box's
    window and every click-head step on the crop and on its mirror image too, averaging the logits (test-time
    augmentation at twice their cost; measured mixed on the two tuning folds, so off by default).
    ``first_click_head=False`` lets the click head take a first click's steps even when the checkpoint has
    a first-click head (for comparisons).

    The API: ``set_image`` (or ``compute_features`` + ``set_features`` for a cache), then ``segment``,
    ``propose`` or ``detect``. ``detect`` is ``label_candidates(detection_candidates())``, the one
    detection pass (propose -> classify -> score) and its last step (class filter, NMS, threshold, cap),
    public for callers that need the candidates themselves (uncertainty.py, the benchmarks).

    A lower-level API, for training, benchmarks and tests: windows (:class:`Candidate`) from
    ``top_windows`` (whole image) or ``coarse_windows`` / ``point_windows`` (around points), their heads
    (``dense_heads``, ``cell_heads``), mask logits (``window_logits``, ``box_window``) and image masks
    (``window_mask``), the quality head's view of them (``quality_inputs``, ``predicted_iou``), MultiPathNet
    on any boxes (``classify``), a click's or a box's first mask (``click_prompt_mask``,
    ``box_prompt_mask``) and one click-head step (``correct``).
    """

    def __init__(
        self,
        model: SegmentationModel,
        metadata: dict | None = None,
        device: str | torch.device = "cpu",
        scales: tuple[float, ...] = PAPER_SCALES,
        mask_threshold: float = 0.5,
        box_threshold: float = BOX_THRESHOLD,
        box_zooms: tuple[float, ...] = BOX_ZOOMS,
        box_min_fit: float = BOX_MIN_FIT,
        first_click_steps: int = FIRST_CLICK_STEPS,
        box_steps: int = 1,
        box_fit_check: bool = True,
        box_grabcut: bool = BOX_GRABCUT,
        first_click_context: float = 1.0,
        correction_steps: int = 1,
        flip_average: bool = False,
        first_click_head: bool = True,
        trunk_engine: str = "torch",
        feature_dtype: torch.dtype = torch.float32,
        trunk_threads: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = copy.deepcopy(model).eval().to(self.device)
        fold_batchnorm(self.model.trunk)
        mpn = self.model.multipathnet
        if mpn is not None and mpn.label_head is not None:
            fold_batchnorm(mpn.label_head.tail)
        self.model.to(memory_format=torch.channels_last)
        self.trunk = build_trunk_engine(self.model.trunk, trunk_engine, self.device, trunk_threads)
        self.metadata = metadata or {}
        self.refine = "sharpmask" in self.metadata.get("stages", [])
        self.scales = tuple(scales)
        self.threshold_logit = math.log(mask_threshold / (1 - mask_threshold))
        self.box_threshold_logit = math.log(box_threshold / (1 - box_threshold))
        self.box_zooms, self.box_min_fit = tuple(box_zooms), box_min_fit
        if min(first_click_steps, box_steps, correction_steps - 1) < 0:
            raise ValueError("click-head steps: at least 0 for a first click or a box, 1 for a correction")
        self.first_click_steps, self.correction_steps = first_click_steps, correction_steps
        self.box_steps, self.box_fit_check, self.box_grabcut = box_steps, box_fit_check, box_grabcut
        self.first_click_context, self.flip_average = first_click_context, flip_average
        if not first_click_head:
            self.model.first_click_head = None
        if feature_dtype not in FEATURE_DTYPES.values():
            raise ValueError(f"feature_dtype must be one of {sorted(FEATURE_DTYPES)}, not {feature_dtype}")
        self.feature_dtype = feature_dtype
        calibration = self.metadata.get(METADATA_KEY)
        self.calibration = None if calibration is None else Calibration.from_json(calibration)
        self.features: ImageFeatures | None = None

    # ---- image features -------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_features(self, image: np.ndarray, trunk: bool = True) -> ImageFeatures:
        """The features of ``image``: the trunk over its whole pyramid, or with ``trunk=False`` none yet,
        each level's taps computed when a prompt or a detection first reads them and kept (with a click
        head, a box and corrective clicks read none, the first click on an object the block around its
        windows, the next object's the whole levels: :meth:`cover`; without one, every prompt reads the
        blocks around its points). The DeepMask heads run later, where needed."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        feats = ImageFeatures(image)
        height, width = image.shape[:2]
        for scale in self.scales:
            rw, rh, pw, ph = level_geometry(height, width, scale)
            feats.levels.append(PyramidLevel(scale, rw / width, rh / height, (ph, pw)))
        if trunk:
            for level in feats.levels:
                self.complete(level, image)
        return feats

    def complete_levels(self) -> None:
        """Run the trunk over every level of the current image that it has not covered whole (a warm-up:
        the first click of every object, and any detection, then find it done)."""
        for level in self._require_features().levels:
            self.complete(level)

    def _taps(self, padded: np.ndarray) -> dict[str, torch.Tensor]:
        """The trunk's taps of a ``(h, w, 3) uint8`` block of a padded level, stored as ``feature_dtype``."""
        x = to_tensor([np.ascontiguousarray(padded)]).to(self.device)
        return {tap: t.to(self.feature_dtype) for tap, t in self.trunk(x).items()}

    @torch.no_grad()
    def complete(self, level: PyramidLevel, image: np.ndarray | None = None) -> None:
        """Run the trunk over the whole ``level`` of ``image`` (default: the current image) unless it has;
        the cells memoised from a block are dropped (whole-level taps differ from a block's by rounding)."""
        if level.complete:
            return
        image = self._require_features().image if image is None else image
        level.hold(self._taps(level_input(image, level.scale)[0]), (0, 0), None)

    @torch.no_grad()
    def cover(self, level: PyramidLevel, rows: Sequence[int], cols: Sequence[int]) -> None:
        """Make ``level``'s taps (of the current image) serve windows ``(rows[n], cols[n])``. The first time,
        the trunk runs on the block of the padded level those windows read plus :data:`BLOCK_MARGIN` pixels
        each side; a level whose block reaches every edge, or that needs a second block (the first click on
        another object), gets the whole level, which then serves every prompt."""
        if level.covers(rows, cols):
            return
        height, width = level.size
        r0, r1, c0, c1 = min(rows), max(rows), min(cols), max(cols)
        y0, x0 = max(0, STRIDE * r0 - BLOCK_MARGIN), max(0, STRIDE * c0 - BLOCK_MARGIN)
        y1 = min(height, STRIDE * r1 + INPUT + BLOCK_MARGIN)
        x1 = min(width, STRIDE * c1 + INPUT + BLOCK_MARGIN)
        if level.taps or (y0, x0, y1, x1) == (0, 0, height, width):
            self.complete(level)
            return
        padded = level_input(self._require_features().image, level.scale)[0]
        level.hold(
            self._taps(padded[y0:y1, x0:x1]),
            (y0 // STRIDE, x0 // STRIDE),
            (range(r0, r1 + 1), range(c0, c1 + 1)),
        )

    @torch.no_grad()
    def dense_heads(self, level: PyramidLevel) -> torch.Tensor:
        """Embedding and objectness of every window of ``level`` (for full-image proposals), kept on the
        level; returns the objectness logits ``(rows, cols)``."""
        if level.scores is None:
            self.complete(level)
            emb = self.model.deepmask.embedding(level.taps["s16"].float())
            level.embedding, level.scores = emb[0].to(self.feature_dtype), self.model.deepmask.score(emb)[0]
        return level.scores

    @torch.no_grad()
    def cell_heads(
        self, level: PyramidLevel, rows: list[int], cols: list[int]
    ) -> tuple[torch.Tensor, list[float]]:
        """Embeddings ``(N, 512)`` and objectness logits of windows ``(rows[n], cols[n])``. Without the dense
        pass, the heads run on the smallest block of the stride-16 map that covers them (same numbers: the
        heads are convolutions; the trunk runs on the level's block first when it has not: :meth:`cover`)
        and the results are memoised on the level."""
        if level.embedding is not None and level.scores is not None:
            vec = level.embedding[:, rows, cols].T.float().contiguous()
            return vec, level.scores[rows, cols].tolist()
        self.cover(level, rows, cols)
        if any((r, c) not in level.cells for r, c in zip(rows, cols, strict=True)):
            top, left = level.origin
            r0, r1, c0, c1 = min(rows) - top, max(rows) - top, min(cols) - left, max(cols) - left
            emb = self.model.deepmask.embedding(
                level.taps["s16"][:, :, r0 : r1 + CELLS + 2, c0 : c1 + CELLS + 2].float()
            )
            scores = self.model.deepmask.score(emb)[0]
            for i in range(r1 - r0 + 1):
                for j in range(c1 - c0 + 1):
                    level.cells[(top + r0 + i, left + c0 + j)] = (emb[0, :, i, j], float(scores[i, j]))
        found = [level.cells[(r, c)] for r, c in zip(rows, cols, strict=True)]
        return torch.stack([v for v, _ in found]), [s for _, s in found]

    def set_image(self, image: np.ndarray, trunk: bool = True) -> None:
        """Compute and keep the features of ``image`` (``(H, W, 3) uint8 RGB``; ``trunk``: see
        :meth:`compute_features`)."""
        self.features = self.compute_features(image, trunk)

    def set_features(self, features: ImageFeatures) -> None:
        """Reuse features computed earlier (e.g. from a per-image cache)."""
        self.features = features

    def _require_features(self) -> ImageFeatures:
        if self.features is None:
            raise RuntimeError("call set_image(image) first")
        return self.features

    # ---- window masks ---------------------------------------------------------------------------------
    @torch.no_grad()
    def window_logits(self, cands: list[Candidate], refine: bool | None = None) -> list[np.ndarray]:
        """Mask logits of each candidate window: ``(160, 160)`` refined, or ``(56, 56)`` DeepMask."""
        feats = self._require_features()
        refine = self.refine if refine is None else refine
        out: dict[int, np.ndarray] = {}
        for li, level in enumerate(feats.levels):
            idx = [n for n, c in enumerate(cands) if c.level == li]
            if not idx:
                continue
            rows = torch.tensor([cands[n].row for n in idx])
            cols = torch.tensor([cands[n].col for n in idx])
            vec, _ = self.cell_heads(level, rows.tolist(), cols.tolist())
            if refine:
                top, left = level.origin
                skips = window_skips(level.taps, torch.zeros_like(rows), rows - top, cols - left)
                logits = self.model.sharpmask(vec, skips)
            else:
                logits = self.model.deepmask.mask(vec)
            for n, lg in zip(idx, logits.float().cpu().numpy(), strict=True):
                out[n] = lg
        return [out[n] for n in range(len(cands))]

    def _window(self, cand: Candidate, logits: np.ndarray) -> WindowMask:
        level = self._require_features().levels[cand.level]
        return WindowMask(
            level.window_box(np.array([cand.row]), np.array([cand.col]))[0], logits, cand.objectness
        )

    def window_mask(self, window: WindowMask, threshold_logit: float | None = None) -> Mask:
        """``window``'s logits pasted onto the current image and thresholded at ``threshold_logit`` (default
        the mask threshold's): a bool ``(H, W)`` mask scored by the window's objectness probability."""
        feats = self._require_features()
        region, (y0, y1, x0, x1) = paste_window(window.logits, window.box, feats.height, feats.width)
        mask = np.zeros((feats.height, feats.width), dtype=bool)
        t = self.threshold_logit if threshold_logit is None else threshold_logit
        mask[y0:y1, x0:x1] = region > t
        return Mask(mask, 1.0 / (1.0 + math.exp(-window.objectness)))

    @torch.no_grad()
    def box_window(self, box: np.ndarray, zoom: float = 1.0) -> WindowMask:
        """The window the models were trained on for an object in ``box`` (xyxy pixels): centred on it, at
        the scale that makes its larger side 92 px (times ``zoom``). One trunk pass on a 192 px crop."""
        feats = self._require_features()
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        scale = zoom * OBJECT / max(box[2] - box[0], box[3] - box[1], 1.0)
        crop = crop_window(feats.pyramid, centre, scale)
        crops = [crop, crop[:, ::-1]] if self.flip_average else [crop]
        taps = self.trunk(to_tensor(crops).to(self.device))
        logits, score, vec = self.model.deepmask(taps["s16"])
        if self.refine:
            batch = torch.arange(len(crops), device=self.device)
            zero = torch.zeros_like(batch)
            logits = self.model.sharpmask(vec, window_skips(taps, batch, zero, zero))
        half = WINDOW / 2 / scale
        wbox = np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half])
        return WindowMask(wbox, _mirror_mean(logits.float().cpu().numpy()), float(score.mean()))

    # ---- proposals ------------------------------------------------------------------------------------
    def top_windows(self, k: int) -> list[Candidate]:
        """The ``k`` highest-objectness windows over all scales (merged sorted lists, no NMS)."""
        feats = self._require_features()
        cands = []
        for li, level in enumerate(feats.levels):
            scores = self.dense_heads(level).float().cpu().numpy()
            flat = np.argsort(-scores, axis=None)[:k]
            rows, cols = np.unravel_index(flat, scores.shape)
            cands += [
                Candidate(li, int(r), int(c), float(scores[r, c])) for r, c in zip(rows, cols, strict=True)
            ]
        cands.sort(key=lambda c: -c.objectness)
        return cands[:k]

    def propose(
        self, k: int = 100, refine: bool | None = None, timings: dict[str, float] | None = None
    ) -> list[Mask]:
        """Top-``k`` object masks of the whole image, best first (scores are objectness probabilities).

        ``refine``: SharpMask's 160x160 masks (default: when the checkpoint has SharpMask) or DeepMask's
        56x56. ``timings``, when given, receives each stage's wall time in ms: ``top_windows`` (dense heads
        and the best windows), ``window_logits`` and ``paste`` (logits to image masks)."""
        with _stage(timings, "top_windows"):
            cands = self.top_windows(k)
        with _stage(timings, "window_logits"):
            logits = self.window_logits(cands, refine)
        with _stage(timings, "paste"):
            return [self.window_mask(self._window(c, lg)) for c, lg in zip(cands, logits, strict=True)]

    # ---- labels ---------------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return self.model.config.classes

    def _classifier_level(self) -> PyramidLevel:
        """MultiPathNet reads the pyramid level nearest to the original resolution (how it was trained)."""
        level = min(self._require_features().levels, key=lambda lv: abs(math.log2(lv.scale)))
        self.complete(level)
        return level

    @torch.no_grad()
    def classify(
        self, boxes: np.ndarray, masks: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """MultiPathNet on ``boxes (R, 4)`` xyxy image pixels of the current image, and their ``masks`` (R
        bool ``(H, W)`` image-pixel masks, which the label head pools over; None pools over the boxes).

        Returns class probabilities ``(R, K+1)`` (column 0 = background, column i = ``classes[i-1]``) and the
        regressed boxes of every class ``(R, K+1, 4)`` xyxy image pixels.
        """
        mpn = self.model.multipathnet
        if mpn is None:
            raise RuntimeError(
                "this checkpoint has no MultiPathNet stage (train one: segmask train multipathnet)"
            )
        level = self._classifier_level()
        scale = np.array([level.sx, level.sy, level.sx, level.sy])
        rois = torch.as_tensor(
            np.asarray(boxes, np.float64).reshape(-1, 4) * scale + PAD, dtype=torch.float32
        )
        coverage = None
        if mpn.label_head is not None:
            self._imagenet_features(level)
            if masks is not None:
                gh, gw = level.taps["imagenet"].shape[-2:]
                coverage = mask_coverage(masks, (level.sx, level.sy), PAD, (gh, gw))
        out = mpn(_Float32Taps(level.taps), rois.to(self.device), coverage)
        n, k = out["probs"].shape
        labels = torch.arange(k).repeat(n)
        decoded = decode_boxes(
            rois.repeat_interleave(k, 0), out["deltas"].cpu().repeat_interleave(k, 0), labels
        )
        decoded = (decoded.view(n, k, 4).numpy() - PAD) / scale
        return out["probs"].float().cpu().numpy(), decoded

    def _imagenet_features(self, level: PyramidLevel) -> None:
        """MultiPathNet's ImageNet features of ``level``, computed once and kept with its taps."""
        if "imagenet" not in level.taps:
            features = self.model.require_multipathnet().imagenet_features(_Float32Taps(level.taps))
            level.taps["imagenet"] = features.to(self.feature_dtype)

    def _label_head(self) -> LabelHead:
        head = self.model.require_multipathnet().label_head
        if head is None:
            raise RuntimeError("this checkpoint's MultiPathNet has no label head")
        return head

    @torch.no_grad()
    def label_head_features(self, masks: Sequence[np.ndarray]) -> torch.Tensor:
        """``(R, D)`` float32: the ImageNet features MultiPathNet's label head pools over each of R bool
        ``(H, W)`` image-pixel ``masks`` of the current image."""
        head = self._label_head()
        level = self._classifier_level()
        self._imagenet_features(level)
        features = level.taps["imagenet"].float()
        grid = (int(features.shape[-2]), int(features.shape[-1]))
        coverage = mask_coverage(masks, (level.sx, level.sy), PAD, grid).to(features.device)
        batch = torch.zeros(len(masks), dtype=torch.long, device=features.device)
        return head.pool(features, coverage, batch).float()

    @torch.no_grad()
    def label_head_inputs(self, masks: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """What MultiPathNet's label head reads for R bool ``(H, W)`` image-pixel ``masks`` of the current
        image: :meth:`label_head_features` ``(R, D)`` and their log ImageNet mass per class ``(R, K)``
        (``LabelHead.logits`` of both are the label logits). For refitting the head elsewhere."""
        pooled = self.label_head_features(masks)
        return pooled, self._label_head().prior_logits(pooled).float()

    def detection_candidates(
        self, proposals: int = 100, timings: dict[str, float] | None = None
    ) -> DetectionCandidates:
        """The detection pass on the current image: the top ``proposals`` refined DeepMask windows
        (:meth:`propose`) with a non-empty mask, labelled by MultiPathNet (:meth:`classify`) and scored by
        the checkpoint's calibration (:meth:`detection_probability`), else by :func:`detection_scores`.
        ``timings``, when given, receives each stage's wall time in ms:
        ``proposals``, ``classify`` and ``scoring``."""
        with _stage(timings, "proposals"):
            masks = [m for m in self.propose(proposals) if m.mask.any()]
        with _stage(timings, "classify"):
            if masks:
                probs, boxes = self.classify(np.stack([m.box for m in masks]), [m.mask for m in masks])
            else:
                k = len(self.classes) + 1
                probs, boxes = np.zeros((0, k), np.float32), np.zeros((0, k, 4))
        with _stage(timings, "scoring"):
            if self.calibration is None:
                scores = detection_scores(masks)
            else:
                scores = self.detection_probability(masks, probs)
        return DetectionCandidates(masks, probs, boxes, scores)

    def detection_probability(self, masks: Sequence[Mask], probs: np.ndarray) -> np.ndarray:
        """The calibrated probability ``(R,)`` that each candidate (``masks`` with their class probabilities
        ``probs (R, K+1)``) is a correct object of its most probable foreground class."""
        if self.calibration is None:
            raise RuntimeError("this checkpoint has no calibration (fit one: segmask calibrate)")
        objectness = np.array([m.score for m in masks], np.float64)
        area = np.array([m.mask.mean() for m in masks], np.float64)
        return self.calibration.probability(candidate_features(objectness, area, probs))

    def label_candidates(
        self,
        candidates: DetectionCandidates,
        score_threshold: float = PREANNOTATION_THRESHOLD,
        max_detections: int | None = PREANNOTATION_MAX,
        nms_iou: float = 0.5,
        classes: Collection[str] | None = None,
    ) -> list[Detection]:
        """The last step of :meth:`detect`: the ``classes`` filter, mask NMS and fragment suppression on
        ``candidates.scores`` (:func:`mask_nms`), the threshold and the cap (arguments as in :meth:`detect`).
        Each detection keeps its candidate's most probable foreground class, whatever MultiPathNet's
        background probability, and that class's box."""
        cfg = self.model.config
        cls = candidates.probs[:, 1:].argmax(axis=1) + 1
        kept: np.ndarray = np.arange(len(candidates))
        if classes is not None:
            wanted = {c.lower() for c in classes}
            kept = np.array([i for i in kept if cfg.classes[cls[i] - 1].lower() in wanted], int)
        if not len(kept):
            return []
        scores, masks = candidates.scores, candidates.masks
        stack = np.stack([masks[i].mask for i in kept])
        nms = [kept[j] for j in mask_nms(stack, scores[kept], nms_iou, fragment=FRAGMENT_SHARE)]
        shown = [i for i in nms if scores[i] >= score_threshold][: max_detections or None]
        return [
            Detection(
                cfg.classes[c - 1],
                cfg.class_ids[c - 1],
                float(scores[i]),
                masks[i].mask,
                candidates.boxes[i, c],
            )
            for i, c in ((i, cls[i]) for i in shown)
        ]

    def detect(
        self,
        score_threshold: float = PREANNOTATION_THRESHOLD,
        max_detections: int | None = PREANNOTATION_MAX,
        proposals: int = 100,
        nms_iou: float = 0.5,
        classes: Collection[str] | None = None,
    ) -> list[Detection]:
        """Labelled objects of the current image, best first.

        ``proposals`` refined DeepMask windows are labelled by MultiPathNet and scored
        (:meth:`detection_candidates`: the calibrated probability of being right when the checkpoint has a
        calibration, else :func:`detection_scores`); duplicates (mask IoU above ``nms_iou``, whatever their
        labels) and fragments (more than :data:`FRAGMENT_SHARE` of the mask inside a kept one) are removed
        greedily, best first; every one scoring at least ``score_threshold`` is kept, at most
        ``max_detections`` when it is set (None or 0: no cap). The defaults are pre-annotation's.
        ``classes``: only masks labelled one of these class names (case-insensitive; a project's label set)
        take part, so the cap counts them alone.
        """
        return self.label_candidates(
            self.detection_candidates(proposals), score_threshold, max_detections, nms_iou, classes
        )

    # ---- interactive ----------------------------------------------------------------------------------
    def segment(
        self,
        points: np.ndarray | list | None = None,
        point_labels: np.ndarray | list | None = None,
        box: np.ndarray | list | None = None,
    ) -> Mask:
        """One object for a prompt: ``points (N, 2)`` pixel (x, y) with ``point_labels (N,)`` 1 = positive,
        0 = negative, in the order the annotator placed them, and/or ``box`` xyxy pixels.

        The box (else the first positive click) gives the first mask (:meth:`box_prompt_mask`,
        :meth:`click_prompt_mask`); with a click head, every other click is a correction of the mask before
        it (:meth:`correct`). The result contains every positive point, no negative one, and (with a box)
        nothing outside the box.
        """
        self._require_features()
        pts = np.zeros((0, 2)) if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 2)
        lab = (
            np.ones(len(pts), int)
            if point_labels is None
            else np.asarray(point_labels, dtype=int).reshape(-1)
        )
        if len(lab) != len(pts):
            raise ValueError(f"{len(pts)} points but {len(lab)} point labels")
        bx = None if box is None else np.asarray(box, dtype=np.float64).reshape(4)
        positive = lab == 1
        if not positive.any() and bx is None:
            raise ValueError("segment needs at least one positive point or a box")
        if self.model.click_head is not None:
            result = self._click_sequence(pts, positive, bx)
        elif bx is not None and not len(pts):
            result = self.box_prompt_mask(bx)
        else:
            result = self._window_segment(pts[positive], pts[~positive], bx)
        return Mask(honour_prompt(result.mask, pts[positive], pts[~positive], bx), result.score)

    def _click_sequence(self, pts: np.ndarray, positive: np.ndarray, box: np.ndarray | None) -> Mask:
        """The first prompt's mask, then ``correction_steps`` :meth:`correct` per further click, each result
        memoised on the image's features by the prompt so far (an annotator's next click costs that, not a
        replay)."""
        order: np.ndarray = np.arange(len(pts))
        if box is None:
            first = int(np.argmax(positive))
            order = np.concatenate([[first], np.delete(order, first)])
        pts, positive = pts[order], positive[order]
        memo = self._require_features().prompt_masks
        start = 0 if box is not None else 1
        result = None
        for k in range(len(pts), start - 1, -1):
            key = _prompt_key(box, pts[:k], positive[:k])
            if key in memo:
                result, start = memo[key], k + 1
                break
        if result is None:
            result = self.box_prompt_mask(box) if box is not None else self.click_prompt_mask(pts[0])
            memo.put(_prompt_key(box, pts[:start], positive[:start]), result)
            start += 1
        for k in range(start, len(pts) + 1):
            for _ in range(self.correction_steps):
                result = self.correct(result.mask, pts[:k], positive[:k])
            memo.put(_prompt_key(box, pts[:k], positive[:k]), result)
        return result

    def click_prompt_mask(self, point: np.ndarray) -> Mask:
        """The object under one positive click (pixel ``(x, y)``): the best-ranked dense
        window around it, thresholded at the click threshold, then (with a click head)
        ``first_click_steps`` steps of the first-click head (the click head when the checkpoint has none),
        each in the zoom window of the mask before it, which is its previous mask; the first step's window
        is ``first_click_context`` times wider, so that the head sees the object around a window mask that
        holds only part of it."""
        point = np.asarray(point, np.float64).reshape(1, 2)
        window = max(self.point_windows(point, None), key=lambda w: self._rank(w, point, point[:0], None))
        result = self.window_mask(window)
        if self.model.click_head is None:
            return result
        head = self.model.first_click_head  # None: the click head takes these steps too
        for step in range(self.first_click_steps):
            region = None
            if step == 0 and result.mask.any():
                region = scale_box(mask_to_box(result.mask), self.first_click_context)
            result = self.correct(result.mask, point, np.ones(1, bool), region=region, head=head)
        return result

    def box_prompt_mask(self, box: np.ndarray) -> Mask:
        """The object in ``box`` (xyxy pixels): of the windows centred on the box at
        ``box_zooms`` of the canonical scale, the mask (at the box threshold, clipped to the box) whose
        tight box best matches ``box``; the filled box when every mask is empty or none matches it by IoU
        >= ``box_min_fit``. With a click head, up to ``box_steps`` steps of the head refine it
        (:meth:`_refine_box`). With ``box_grabcut``, GrabCut's colour models seeded by the mask decide its
        boundary inside the box last, for any checkpoint (segmodels.grabcut_refine)."""
        feats = self._require_features()
        inside = box_mask(box, feats.height, feats.width)
        best, fit = Mask(inside, 0.0), -1.0
        for zoom in self.box_zooms:
            candidate = self.window_mask(self.box_window(box, zoom), self.box_threshold_logit)
            candidate.mask &= inside
            score = _mask_box_fit(candidate.mask, box)
            if score > fit:
                best, fit = candidate, score
        result = best if fit >= self.box_min_fit else Mask(inside, 0.0)
        if self.model.click_head is not None and self.box_steps:
            result = self._refine_box(result, box, inside)
        if self.box_grabcut:
            result = Mask(refine_in_box(feats.image, result.mask, box), result.score)  # within the box
        return result

    def _refine_box(self, first: Mask, box: np.ndarray, inside: np.ndarray) -> Mask:
        """Up to ``box_steps`` steps of the click head over the whole ``box`` (xyxy pixels; ``inside``: its
        pixels with the prompt's tolerance), a positive click at ``first``'s deepest point (the box's centre
        when it is empty); with ``box_fit_check`` a step is kept only when its tight box fits ``box`` at
        least as well as the one before, else refining stops."""
        seed = click_point(first.mask) if first.mask.any() else ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        result = first
        for _ in range(self.box_steps):
            refined = self.correct(result.mask, np.array([seed], np.float64), np.ones(1, bool), region=box)
            refined.mask &= inside
            if self.box_fit_check and _mask_box_fit(refined.mask, box) < _mask_box_fit(result.mask, box):
                break
            result = refined
        return result

    @torch.no_grad()
    def correct(
        self,
        previous: np.ndarray,
        points: np.ndarray,
        positive: np.ndarray,
        region: np.ndarray | None = None,
        head: ClickHead | None = None,
    ) -> Mask:
        """One step of the click head (or of ``head``, e.g. the first-click head): ``previous (H, W) bool``
        mask, every click so far ``points (N, 2)`` pixel (x, y) with ``positive (N,)`` bool -> the new mask,
        scored by its pixels' mean probability. The head sees the zoom window of ``region`` (xyxy pixels;
        default: the previous mask's tight box) and the clicks (click_head.zoom_window); pixels outside it
        keep their previous value."""
        if self.model.click_head is None:
            raise RuntimeError("this checkpoint has no click head (train one: segmask train clicks)")
        click_head = self.model.click_head if head is None else head
        feats = self._require_features()
        if region is None:
            region = mask_to_box(previous) if previous.any() else None
        centre, scale = zoom_window(region, points)
        crop = crop_window(feats.pyramid, centre, scale, size=CROP)
        before = crop_mask(previous.astype(np.uint8) * 255, centre, scale, False, CROP)
        maps = click_maps(crop_points(points, centre, scale), positive.astype(int))
        crops, prompts = [crop], [np.concatenate([maps, before[None]])]
        if self.flip_average:
            crops.append(crop[:, ::-1])
            prompts.append(prompts[0][:, :, ::-1])
        taps = self.trunk(to_tensor(crops).to(self.device))
        views = click_head(taps, torch.from_numpy(np.stack(prompts)).to(self.device))
        logits = _mirror_mean(views.float().cpu().numpy())
        half = CROP / 2 / scale
        window = np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half])
        region_logits, (y0, y1, x0, x1) = paste_window(logits, window, feats.height, feats.width)
        mask = previous.copy()
        inside = region_logits > 0
        mask[y0:y1, x0:x1] = inside
        confidence = float(1 / (1 + np.exp(-region_logits[inside])).mean()) if inside.any() else 0.0
        return Mask(mask, confidence)

    def _window_segment(self, pos: np.ndarray, neg: np.ndarray, box: np.ndarray | None) -> Mask:
        """Checkpoints without a click head: the best-ranked window for the positives (and the box), a
        missed positive adding its own best window, a negative cutting away the part on its side."""
        feats = self._require_features()
        options = [self.box_window(box)] if box is not None else []
        if len(pos):
            options += self.point_windows(pos, box)
        result = self.window_mask(max(options, key=lambda w: self._rank(w, pos, np.zeros((0, 2)), box)))
        mask = result.mask
        for p in pos[~_inside(mask, pos)]:
            single = p[None]
            mask |= self.window_mask(
                max(self.point_windows(single, None), key=lambda w: self._rank(w, single, neg, None))
            ).mask
        if len(neg) and _inside(mask, neg).any():
            reference = pos
            if not len(pos) and box is not None:  # a box alone: keep the side of its centre
                reference = np.array([[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]])
            mask &= nearer_to(reference, neg, feats.height, feats.width)
        return result

    def _prompt_candidates(self, anchors: np.ndarray) -> list[Candidate]:
        """Windows whose centres are among the 2x2 nearest to each anchor, at every scale."""
        feats = self._require_features()
        cands = []
        for li, level in enumerate(feats.levels):
            nrows, ncols = level.grid
            cells: list[tuple[int, int]] = []
            for x, y in anchors:
                r, c = level.cell_of(float(x), float(y))
                for rr in {min(max(math.floor(r), 0), nrows - 1), min(max(math.ceil(r), 0), nrows - 1)}:
                    for cc in {min(max(math.floor(c), 0), ncols - 1), min(max(math.ceil(c), 0), ncols - 1)}:
                        if (rr, cc) not in cells:
                            cells.append((rr, cc))
            rows, cols = [r for r, _ in cells], [c for _, c in cells]
            _, scores = self.cell_heads(level, rows, cols)
            cands += [Candidate(li, r, c, sc) for r, c, sc in zip(rows, cols, scores, strict=True)]
        return cands

    def _rank(self, window: WindowMask, pos: np.ndarray, neg: np.ndarray, box: np.ndarray | None) -> float:
        """Higher is better: every violated point costs more than any difference of the window's predicted
        IoU (when it has one) or objectness."""
        t = self.threshold_logit
        violations = 0
        if len(pos):
            violations += int((sample_window(window.logits, window.box, pos) <= t).sum())
        if len(neg):
            violations += int((sample_window(window.logits, window.box, neg) > t).sum())
        rank = -100.0 * violations + (window.objectness if window.quality is None else window.quality)
        if box is not None:
            mbox = _logit_box(window.logits - t, window.box)
            rank += 20.0 * (box_iou_xyxy(mbox, box) if mbox is not None else 0.0)
        return rank

    def point_windows(self, pos: np.ndarray, box: np.ndarray | None) -> list[WindowMask]:
        """The 3 best-ranked dense windows around the positive points ``pos (N, 2)`` pixel (x, y) (and their
        centroid), refined, best first; ``box`` (xyxy pixels, or None) counts in the ranking. A lone click
        without a box, the prompt the quality head was trained on, ranks by its predicted IoU."""
        anchors = np.concatenate([pos, pos.mean(axis=0, keepdims=True)]) if len(pos) > 1 else pos
        cands, coarse = self.coarse_windows(anchors)
        if self.model.quality_head is not None and len(pos) == 1 and box is None:
            quality = self.predicted_iou(cands, coarse, pos[0])
            coarse = [replace(w, quality=float(q)) for w, q in zip(coarse, quality, strict=True)]
        none = np.zeros((0, 2))
        order = sorted(range(len(cands)), key=lambda n: -self._rank(coarse[n], pos, none, box))[:3]
        logits = self.window_logits([cands[n] for n in order])
        return [replace(coarse[n], logits=lg) for n, lg in zip(order, logits, strict=True)]

    def coarse_windows(self, anchors: np.ndarray) -> tuple[list[Candidate], list[WindowMask]]:
        """The candidate windows around image-pixel ``anchors (N, 2)`` (:meth:`_prompt_candidates`) and their
        coarse DeepMask masks."""
        cands = self._prompt_candidates(anchors)
        logits = self.window_logits(cands, refine=False)
        return cands, [self._window(c, lg) for c, lg in zip(cands, logits, strict=True)]

    def quality_inputs(
        self, cands: list[Candidate], coarse: list[WindowMask], point: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The quality head's inputs for a click at ``point`` (image pixel ``(x, y)``) and its candidate
        windows with their coarse (DeepMask) masks: embeddings ``(N, 512)`` and features ``(N, F)``
        (quality_head.window_features)."""
        feats = self._require_features()
        embeddings = torch.zeros(len(cands), self.model.config.embed_dim, device=self.device)
        for li, level in enumerate(feats.levels):
            idx = [n for n, c in enumerate(cands) if c.level == li]
            if idx:
                vec, _ = self.cell_heads(level, [cands[n].row for n in idx], [cands[n].col for n in idx])
                embeddings[idx] = vec.float()
        size = (feats.height, feats.width)
        features = np.stack(
            [
                window_features(
                    w.logits, w.box, point, feats.levels[c.level].sx, w.objectness, size, self.threshold_logit
                )
                for c, w in zip(cands, coarse, strict=True)
            ]
        )
        return embeddings, torch.from_numpy(features).to(self.device)

    @torch.no_grad()
    def predicted_iou(
        self, cands: list[Candidate], coarse: list[WindowMask], point: np.ndarray
    ) -> np.ndarray:
        """The quality head's predicted IoU ``(N,)`` of each candidate window's mask with the object under
        the click ``point`` (image pixel ``(x, y)``), from its coarse mask ``coarse[n]``."""
        if self.model.quality_head is None:
            raise RuntimeError("this checkpoint has no quality head (train one: segmask train quality)")
        return self.model.quality_head(*self.quality_inputs(cands, coarse, point)).float().cpu().numpy()


class _Float32Taps(Mapping[str, torch.Tensor]):
    """A level's taps read as float32, each widened when a head first reads it (MultiPathNet reads three of
    the four; the stored tensors themselves when they are float32)."""

    def __init__(self, taps: dict[str, torch.Tensor]) -> None:
        self._taps = taps
        self._read: dict[str, torch.Tensor] = {}

    def __getitem__(self, tap: str) -> torch.Tensor:
        if tap not in self._read:
            self._read[tap] = self._taps[tap].float()
        return self._read[tap]

    def __iter__(self) -> Iterator[str]:
        return iter(self._taps)

    def __len__(self) -> int:
        return len(self._taps)


def _prompt_key(box: np.ndarray | None, points: np.ndarray, positive: np.ndarray) -> tuple:
    return (None if box is None else tuple(box.tolist()), points.tobytes(), positive.tobytes())


def honour_prompt(mask: np.ndarray, pos: np.ndarray, neg: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """``mask`` made to agree with the prompt: a disk of :data:`POINT_RADIUS` px set around every positive
    point and cleared around every negative one (the annotator's own clicks are never contradicted), and
    everything outside a given box (grown by 2%) cleared."""
    height, width = mask.shape
    out = mask.copy()
    for points, value in ((pos, True), (neg, False)):
        for x, y in points:
            cv2.circle(out.view(np.uint8), (int(x), int(y)), POINT_RADIUS, int(value), -1)
    if box is not None:
        out &= box_mask(box, height, width)
    return out


def detection_scores(masks: Sequence[Mask]) -> np.ndarray:
    """How likely each mask is a whole object worth showing, ``(R,)`` in [0, 1]: the odds of its window's
    objectness times the share of the image the mask covers, as a probability (``odds / (1 + odds)``).

    Why not objectness alone: it is near 1 for most windows, where small fragments of an object outrank the
    whole one by a hair; weighting by area ranks the whole object first (best detection per image holding
    an object: 0.83 vs 0.68 in cross-validation, 0.48 both held out; bench/bench_preannotation.py).
    MultiPathNet's class probability is left out: its background probability, from towers that memorise
    the training images, ranked worse in both (0.48 in cross-validation, 0.27 held out).
    """
    objectness = np.clip(np.array([m.score for m in masks], np.float64), 0.0, 1.0 - 1e-9)
    share = np.array([m.mask.mean() for m in masks], np.float64)
    odds = objectness / (1.0 - objectness) * share
    return odds / (1.0 + odds)


def mask_overlaps(masks: np.ndarray, stride: int = 4) -> np.ndarray:
    """Pairwise intersections ``(N, N)`` float64, in pixels of ``(N, H, W)`` bool masks subsampled by
    ``stride`` (the diagonal holds the areas): plenty to tell duplicates and parts apart, 16x cheaper."""
    flat = masks[:, ::stride, ::stride].reshape(len(masks), -1).astype(np.float32)
    return (flat @ flat.T).astype(np.float64)


def select_masks(overlaps: np.ndarray, scores: np.ndarray, iou: float, fragment: float = 1.0) -> list[int]:
    """Greedy suppression, best score first, from pairwise mask intersections ``overlaps (N, N)``
    (:func:`mask_overlaps`): a mask is dropped when its IoU with a kept one is above ``iou`` or when more
    than ``fragment`` of it lies inside a kept one (1.0: never), and at the end, a kept mask with more than
    ``fragment`` inside a larger kept one that ranked below it (whole objects over their parts). Returns the
    indices kept, best first."""
    order = np.argsort(-scores)
    area = np.diag(overlaps)
    kept: list[int] = []
    for i in order:
        inter = overlaps[i, kept]
        union = area[i] + area[kept] - inter
        ious = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        inside = inter / area[i] if area[i] > 0 else np.zeros_like(inter)
        if not (ious > iou).any() and not (inside > fragment).any():
            kept.append(int(i))
    if fragment >= 1.0:
        return kept
    return [
        i
        for i in kept
        if not any(overlaps[i, k] > fragment * area[i] and area[k] > area[i] for k in kept if k != i)
    ]


def mask_nms(
    masks: np.ndarray, scores: np.ndarray, iou: float, stride: int = 4, fragment: float = 1.0
) -> list[int]:
    """Greedy non-maximum suppression of ``(N, H, W)`` bool masks (:func:`select_masks` on masks subsampled
    by ``stride``): indices kept, best score first; ``fragment`` < 1 also drops masks mostly inside a kept
    one."""
    return select_masks(mask_overlaps(masks, stride), scores, iou, fragment)


def _mirror_mean(views: np.ndarray) -> np.ndarray:
    """``(V, S, S)`` logits of a crop and, when ``V == 2``, of its mirror image (``flip_average``) -> the
    ``(S, S)`` logits: the first view's, or the mean of both with the mirror's mirrored back."""
    return views[0] if len(views) == 1 else (views[0] + views[1, :, ::-1]) / 2


def _inside(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: whether each ``(x, y)`` pixel point falls on a set pixel of ``mask``."""
    h, w = mask.shape
    cols = np.clip(np.floor(points[:, 0]).astype(int), 0, w - 1)
    rows = np.clip(np.floor(points[:, 1]).astype(int), 0, h - 1)
    return mask[rows, cols]


def nearer_to(keep: np.ndarray, drop: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels nearer (Euclidean) to some ``keep`` point than to every ``drop`` point: a negative click cuts
    away the part of the mask on its side, the annotator's usual intent."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5

    def nearest(points: np.ndarray) -> np.ndarray:
        # A running minimum: memory of two images whatever the number of points, not one image per point.
        best = np.full((height, width), np.inf, np.float32)
        for x, y in points:
            np.minimum(best, (xs - x) ** 2 + (ys - y) ** 2, out=best)
        return best

    return nearest(keep) < nearest(drop)


def box_mask(box: np.ndarray, height: int, width: int, margin: float = 0.02) -> np.ndarray:
    """Pixels whose centres fall in ``box`` (xyxy pixels) grown by ``margin`` of its size on each side."""
    mx, my = margin * (box[2] - box[0]), margin * (box[3] - box[1])
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    inx = (xs >= box[0] - mx) & (xs <= box[2] + mx)
    iny = (ys >= box[1] - my) & (ys <= box[3] + my)
    return iny[:, None] & inx[None, :]


def load_predictor(
    path: str | Path | None = None, device: str | torch.device = "cpu", **kwargs: Any
) -> MaskPredictor:
    """A predictor from a checkpoint directory (the shipped default when ``path`` is None); ``kwargs`` go to
    :class:`MaskPredictor`."""
    model, meta = load_checkpoint(DEFAULT_CHECKPOINT if path is None else path, device)
    return MaskPredictor(model, meta, device, **kwargs)
