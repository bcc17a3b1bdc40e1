"""The papers' evalPerPatch: mask IoU of each trained stage (DeepMask, SharpMask) on fixed-seed, un-augmented
jittered windows (``data.WindowSampler``), at the logits' resolution; mean IoU and success@.5/.7.

Windows are ``(B, 3, 192, 192) float32``; targets ``(B, 160, 160)`` in {0, 1}.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from segmodels.data import CocoInstances, WindowSampler
from segmodels.device import to_device
from segmodels.predictor import MaskPredictor
from segmodels.train import batch_iou, mask_logits

# The same windows as training's Validation (seed 10_000 + train seed 0), continued to n windows.
PATCH_SEED = 10_000
PATCH_THRESHOLDS = (0.5, 0.7)
PATCH_BATCH = 32


@torch.no_grad()
def evaluate_patches(predictor: MaskPredictor, dataset: CocoInstances, n: int) -> dict[str, dict[str, float]]:
    """evalPerPatch: mask IoU of each trained stage on ``n`` un-augmented jittered windows of ``dataset``
    (``WindowSampler.mask_batch``, seed :data:`PATCH_SEED`), at the logits' resolution (56 px DeepMask,
    160 px SharpMask). ``{stage: {"n", "mean_iou", "success@0.5", "success@0.7"}}``."""
    stages = ["deepmask", "sharpmask"] if predictor.refine else ["deepmask"]
    sampler = WindowSampler(dataset, seed=PATCH_SEED, augment=False)
    ious: dict[str, list[torch.Tensor]] = {stage: [] for stage in stages}
    for start in tqdm(range(0, n, PATCH_BATCH), desc="patches", unit="batch", dynamic_ncols=True):
        inputs, targets = sampler.mask_batch(min(PATCH_BATCH, n - start))
        x, y = to_device(inputs, predictor.device), targets.to(predictor.device)
        for stage in stages:
            ious[stage].append(batch_iou(mask_logits(predictor.model, stage, x), y).cpu())
    out = {}
    for stage, parts in ious.items():
        iou = torch.cat(parts)
        out[stage] = {"n": len(iou), "mean_iou": iou.mean().item()}
        out[stage].update({f"success@{t}": (iou >= t).float().mean().item() for t in PATCH_THRESHOLDS})
    return out
