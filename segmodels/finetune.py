"""Fine-tune a served checkpoint on a project's annotations, and decide whether the result may replace it.

The retraining loop: the serving layer writes a project's accepted annotations as a COCO-format directory
(``instances.json`` + ``images/``), calls :func:`finetune` on the checkpoint it serves, then :func:`compare`
on a held-out slice of the same project, and publishes the new checkpoint only when ``better_or_equal``.

:func:`finetune` runs the training stages of ``segmask train`` one after the other on the same in-memory
model, with their own step functions (``train.train_step``, ``train_multipathnet.multipathnet_step``):

1. ``deepmask``: DeepMask heads and the trunk's top (stride-16 stage, 10x smaller learning rate), on crops
   from the data's instances that have a mask (box-only annotations are objectness positives only);
2. ``sharpmask``: the refinement modules, the rest frozen (only when the checkpoint has that stage);
   then ``clicks``: the click head with iterative click simulation on the trunk as steps 1-2 left it
   (``train_clicks.fit_click_head``; only when the checkpoint has a click head), and ``first-click`` the
   same for the first-click head (when it has one); then ``quality``: the
   quality head continues training, with its input standardisation kept, on first-click candidates of
   the data's instances from the model of steps 1-2 (``train_quality``: the annotator's click and
   ``quality_extra_clicks`` random interior ones per instance, no mirror images; only when the checkpoint
   has a quality head): the windows' embeddings change with DeepMask, and a head left as it was would
   rank them by a stale picture of them;
3. ``proposals``: top-100 refined proposals of every training image from the model of steps 1-2;
4. ``multipathnet``: the label heads on the frozen trunk, for the data's label set (below).

Classes: the new checkpoint's classes are the data's categories, ordered by category id (as ``segmask train
multipathnet``). A class whose name matches one of the old checkpoint's (case-insensitively) keeps its
classifier and box-regression rows; other names get fresh rows; background and the class-agnostic layers are
kept. A category without annotations is still a class (with its rows untrained or kept).

Budget: the defaults of :class:`FinetuneConfig` are sized for ~20 annotated 640x480 images on 2 CPU cores in
at most two minutes, proposals included: 72-91 s measured (bench/README.md, bench_active_learning.py).
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segmodels.checkpoint import load_checkpoint, save_checkpoint
from segmodels.checkpoint_files import METADATA_FILE, WEIGHTS_FILE, checkpoint_version, read_metadata
from segmodels.data import CocoInstances, Instance, WindowSampler
from segmodels.device import resolve_device
from segmodels.eval_interactive import MIN_AREA, evaluate_clicks
from segmodels.model import SegmentationModel
from segmodels.predictor import MaskPredictor, load_predictor
from segmodels.train import parameter_groups, train_step
from segmodels.train_clicks import FIRST_CLICK_WINDOW_PROBABILITY, ClickTrainConfig, fit_click_head
from segmodels.train_common import STAGES, TrainConfig
from segmodels.train_multipathnet import (
    TapCache,
    class_list,
    fit_labels,
    instance_box,
    instance_region,
    multipathnet_parameters,
    multipathnet_step,
    rois_of_image,
    usable_rois,
)
from segmodels.train_quality import QualityTrainConfig, collect_samples, fit_quality_head

log = logging.getLogger(__name__)
# The stages a fine-tuning job trains, in order (the click head is trained on the trunk the mask stages left).
FINETUNE_STAGES = (*STAGES[:2], "clicks", "first-click", "quality", *STAGES[2:])

Progress = Callable[[str, float], None]
# Expected seconds per unit of work (a step, or an image's proposals) for the job's progress fraction and
# the bar's ETA: the defaults below on 20 COCO128 images, 2 CPU cores, glibc's default allocator settings.
UNIT_SECONDS = {
    "loading": 1.5,
    "deepmask": 0.28,
    "sharpmask": 0.3,
    "clicks": 0.7,
    "first-click": 0.7,
    "quality_samples": 1.2,
    "quality": 0.01,
    "proposals": 0.93,
    "multipathnet": 0.19,
    "saving": 0.5,
}
# compare(): the decision rule's constants (see its docstring).
MIN_COMPARE_INSTANCES = 5
TOLERANCE = 0.01
MAX_CLICK_DROP = 0.05
ROUNDING = 1e-9


@dataclass
class FinetuneConfig:
    """What :func:`finetune` trains and for how long.

    ``*_steps``: optimiser steps per stage (0 skips it, as does ``train_<stage> = False``); ``batch_size``:
    ``(B, 3, 192, 192)`` crops per step of the mask stages; ``multipathnet_batch_size``: RoIs per step
    (``// 16`` images of 64 RoIs each, as ``segmask train multipathnet``). ``lr`` (mask stages; the trunk's
    top gets 10x less, from ``trunk_trainable_from`` up, None freezing the trunk) and ``multipathnet_lr``
    peak after a short warm-up and decay along a cosine within each stage (``train_common.lr_at``), with
    AdamW.
    ``compact``: large matrices stored as float16 (half the size of a model version).
    """

    deepmask_steps: int = 40
    sharpmask_steps: int = 40
    click_steps: int = 30
    click_lr: float = 3e-4
    quality_steps: int = 200
    quality_lr: float = 3e-4
    quality_extra_clicks: int = 1
    multipathnet_steps: int = 250
    batch_size: int = 16
    multipathnet_batch_size: int = 64
    lr: float = 1e-4
    multipathnet_lr: float = 1e-3
    weight_decay: float = 5e-4
    multipathnet_weight_decay: float = 0.1
    trunk_trainable_from: str | None = "s16"
    train_deepmask: bool = True
    train_sharpmask: bool = True
    train_clicks: bool = True
    train_quality: bool = True
    train_multipathnet: bool = True
    seed: int = 0
    device: str = "auto"
    augment: bool = True
    compact: bool = True

    def stage_config(self, stage: str, data: Path) -> TrainConfig:
        """The ``segmask train`` configuration of one stage on ``data`` (its schedule, batch and learning
        rate; nothing is written to its ``out``)."""
        steps = {
            "deepmask": self.deepmask_steps,
            "sharpmask": self.sharpmask_steps,
            "multipathnet": self.multipathnet_steps,
        }[stage]
        mpn = stage == "multipathnet"
        return TrainConfig(
            stage=stage,
            data=str(data),
            out="",
            epochs=1,
            steps_per_epoch=steps,
            batch_size=self.multipathnet_batch_size if mpn else self.batch_size,
            lr=self.multipathnet_lr if mpn else self.lr,
            weight_decay=self.multipathnet_weight_decay if mpn else self.weight_decay,
            trunk_trainable_from=self.trunk_trainable_from,
            seed=self.seed,
            device=self.device,
            augment=self.augment,
            compact=self.compact,
        )


BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"
# The callback hears of every stage change and otherwise of every REPORT_EVERY of the job (~100 calls).
REPORT_EVERY = 0.01


class JobProgress:
    """Progress of the whole job: units of work per stage, weighted by :data:`UNIT_SECONDS`. Drives one tqdm
    bar (percent of the job) and ``callback(stage, fraction)``, called when a stage starts and after every
    :data:`REPORT_EVERY` of the job, with a non-decreasing fraction in [0, 1], last with exactly 1.0."""

    def __init__(self, plan: dict[str, int], callback: Progress | None) -> None:
        self.total = sum(UNIT_SECONDS[stage] * units for stage, units in plan.items())
        self.callback = callback
        self.done = 0.0
        self.reported = -1.0
        self.stage = next(iter(plan))
        self.bar = tqdm(total=100.0, desc="finetune", unit="%", dynamic_ncols=True, bar_format=BAR_FORMAT)

    def start(self, stage: str) -> None:
        self.stage = stage
        self.bar.set_description(f"finetune {stage}")
        self._report(force=True)

    def advance(self, loss: float | None = None) -> None:
        """One unit of the current stage done (``loss``: shown on the bar)."""
        self.done += UNIT_SECONDS[self.stage]
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self._report()

    def finish(self) -> None:
        self.done = self.total
        self._report(force=True)
        self.bar.close()

    def close(self) -> None:
        self.bar.close()

    def _report(self, force: bool = False) -> None:
        fraction = min(1.0, self.done / self.total)
        self.bar.update(100.0 * fraction - self.bar.n)
        if self.callback is not None and (force or fraction >= self.reported + REPORT_EVERY):
            self.reported = fraction
            self.callback(self.stage, fraction)


# ---- classes -------------------------------------------------------------------------------------------
def remap_classes(model: SegmentationModel, names: Sequence[str], ids: Sequence[int]) -> list[str]:
    """Give ``model`` the label set ``names`` (dataset category ids ``ids``), keeping what it knows.

    A fresh MultiPathNet is built for ``names``; from the old one it takes every class-agnostic layer, the
    background rows, and the rows of each new class whose name matches an old class case-insensitively: the
    ``(K+1, hidden)`` classifier rows (one classifier per IoU threshold), the 4 box-regression rows per
    class of the ``((K+1) * 4, tower)`` box head, and the label head's rows and prior weight (its frozen
    ImageNet tail is shared). Returns the names that kept their rows.
    """
    old, old_names = model.multipathnet, list(model.config.classes)
    model.set_classes(list(names), list(ids))
    if old is None:
        return []
    new = model.require_multipathnet()
    for part in ("mix", "towers", "shared"):
        getattr(new, part).load_state_dict(getattr(old, part).state_dict())
    old_row: dict[str, int] = {}
    for row, name in enumerate(old_names, start=1):
        old_row.setdefault(name.lower(), row)
    kept = [(row, old_row[n.lower()]) for row, n in enumerate(names, start=1) if n.lower() in old_row]
    dst = torch.tensor([0] + [d for d, _ in kept])
    src = torch.tensor([0] + [s for _, s in kept])
    with torch.no_grad():
        for new_head, old_head in zip(new.classifiers, old.classifiers, strict=True):
            assert isinstance(new_head, torch.nn.Linear) and isinstance(old_head, torch.nn.Linear)
            new_head.weight[dst] = old_head.weight[src]
            new_head.bias[dst] = old_head.bias[src]
        box_w = new.box_head.weight.view(new.num_classes + 1, 4, -1)
        box_b = new.box_head.bias.view(new.num_classes + 1, 4)
        box_w[dst] = old.box_head.weight.view(old.num_classes + 1, 4, -1)[src]
        box_b[dst] = old.box_head.bias.view(old.num_classes + 1, 4)[src]
        if new.label_head is not None and old.label_head is not None:
            # The label head has no background row: class i is row i - 1.
            new.label_head.linear.weight[dst[1:] - 1] = old.label_head.linear.weight[src[1:] - 1]
            new.label_head.linear.bias[dst[1:] - 1] = old.label_head.linear.bias[src[1:] - 1]
            new.label_head.prior_weight.copy_(old.label_head.prior_weight)
    return [names[d - 1] for d, _ in kept]


# ---- stages --------------------------------------------------------------------------------------------
def tail_means(series: dict[str, list[float]]) -> dict[str, float]:
    """Each series' mean over its last quarter (at least one value): a stage's final losses."""
    return {name: float(np.mean(v[-max(1, len(v) // 4) :])) for name, v in series.items() if v}


def train_mask_stage(
    model: SegmentationModel, dataset: CocoInstances, cfg: TrainConfig, job: JobProgress
) -> dict[str, float]:
    """``cfg.total_steps`` steps of the ``deepmask`` or ``sharpmask`` stage (``train.train_step``) on
    ``dataset``'s instances; returns the mean of each loss over the last quarter of the steps."""
    device = resolve_device(cfg.device)
    model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = WindowSampler(dataset, seed=cfg.seed, augment=cfg.augment)
    losses: dict[str, list[float]] = {}
    job.start(cfg.stage)
    for step in range(cfg.total_steps):
        name, loss = train_step(model, optimizer, sampler, cfg, step, device)
        losses.setdefault(name, []).append(loss)
        job.advance(loss=loss)
    return tail_means(losses)


def train_label_stage(
    model: SegmentationModel,
    refined: bool,
    dataset: CocoInstances,
    cfg: TrainConfig,
    job: JobProgress,
) -> dict[str, float]:
    """Proposals of every image from (a copy of) ``model``, then ``cfg.total_steps`` MultiPathNet steps
    (``train_multipathnet.multipathnet_step``) for the label set ``model.config.classes``, after fitting the
    label head (``train_multipathnet.fit_labels``); returns the mean losses over the last quarter of the steps
    and the label head's fit (empty when no image has an instance)."""
    device = resolve_device(cfg.device)
    labels = {cid: n + 1 for n, cid in enumerate(model.config.class_ids)}
    proposer = MaskPredictor(model, {"stages": ["sharpmask"] if refined else []}, device)
    job.start("proposals")
    rois = []
    for index in range(len(dataset)):
        image_rois = rois_of_image(proposer, dataset, index, labels)
        if image_rois is not None:
            rois.append(image_rois)
        job.advance()
    del proposer
    usable = usable_rois(rois)
    if not usable:
        log.warning("no image has a foreground RoI: MultiPathNet is not trained")
        return {}
    params = multipathnet_parameters(model)
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr_scale": 1.0}], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    taps = TapCache(model, dataset, device)
    rng = np.random.default_rng(cfg.seed)
    parts: dict[str, list[float]] = {"train_cls_loss": [], "train_box_loss": []}
    job.start("multipathnet")
    label_fit = fit_labels(model, taps, labels)
    for step in range(cfg.total_steps):
        loss, step_parts = multipathnet_step(model, optimizer, taps, usable, rng, cfg, step)
        for name, values in step_parts.items():
            parts[name].append(float(np.mean(values)))
        job.advance(loss=loss)
    return {**tail_means(parts), **label_fit}


def train_click_stage(
    model: SegmentationModel, stage: str, dataset: CocoInstances, cfg: FinetuneConfig, job: JobProgress
) -> dict[str, float]:
    """``cfg.click_steps`` steps of the click head (``stage`` ``clicks``) or of the first-click head
    (``first-click``, its crops framed as ``segmask train first-click`` frames them) on ``dataset``, reading
    the trunk as the mask stages left it; returns the mean loss over the last quarter of the steps."""
    first_click = stage == "first-click"
    head = model.first_click_head if first_click else model.click_head
    if head is None:
        raise ValueError(f"the checkpoint lists the {stage} stage but has no such head")
    click_cfg = ClickTrainConfig(
        str(dataset.root),
        "",
        "",
        steps=cfg.click_steps,
        batch_size=cfg.batch_size,
        lr=cfg.click_lr,
        window_probability=FIRST_CLICK_WINDOW_PROBABILITY if first_click else 0.0,
        seed=cfg.seed,
        device=cfg.device,
    )
    head.to(resolve_device(cfg.device)).train()
    job.start(stage)
    curve = fit_click_head(head, model.trunk, dataset, click_cfg, lambda loss: job.advance(loss))
    return tail_means({"click_loss": curve})


def train_quality_stage(
    model: SegmentationModel, refined: bool, dataset: CocoInstances, cfg: FinetuneConfig, job: JobProgress
) -> dict[str, float]:
    """``cfg.quality_steps`` steps of the quality head on the first-click candidates of ``dataset``'s
    instances from (a copy of) ``model`` (module docstring); returns the mean loss over the last quarter of
    the steps (empty when no instance is large enough to train on)."""
    device = resolve_device(cfg.device)
    quality_cfg = QualityTrainConfig(
        str(dataset.root),
        "",
        "",
        extra_clicks=cfg.quality_extra_clicks,
        flips=False,
        steps=cfg.quality_steps,
        lr=cfg.quality_lr,
        seed=cfg.seed,
        device=cfg.device,
    )
    predictor = MaskPredictor(model, {"stages": ["sharpmask"] if refined else []}, device)
    job.start("quality_samples")
    try:
        samples = collect_samples(predictor, dataset, quality_cfg, job.advance)
    except ValueError as error:
        log.warning("the quality head is not trained: %s", error)
        return {}
    finally:
        del predictor
    quality_head = model.quality_head
    if quality_head is None:
        raise ValueError("the checkpoint lists the quality stage but has no quality head")
    quality_head.to(device)
    job.start("quality")
    curve = fit_quality_head(
        quality_head, samples, quality_cfg, lambda loss: job.advance(loss), standardise=False
    )
    return tail_means({"quality_loss": curve})


# ---- the job -------------------------------------------------------------------------------------------
def plan_stages(cfg: FinetuneConfig, init_stages: Sequence[str], dataset: CocoInstances) -> dict[str, int]:
    """Units of work per stage that will run (in order): steps, or images for ``proposals``.

    Mask stages need instances with a mask; ``sharpmask`` runs only on a checkpoint that has that stage;
    MultiPathNet needs instances (box-only ones count)."""
    masked = any(inst.has_mask for inst in dataset.instances)
    plan = {"loading": 1}
    if cfg.train_deepmask and masked and cfg.deepmask_steps > 0:
        plan["deepmask"] = cfg.deepmask_steps
    if cfg.train_sharpmask and masked and "sharpmask" in init_stages and cfg.sharpmask_steps > 0:
        plan["sharpmask"] = cfg.sharpmask_steps
    for stage in ("clicks", "first-click"):
        if cfg.train_clicks and masked and stage in init_stages and cfg.click_steps > 0:
            plan[stage] = cfg.click_steps
    if cfg.train_quality and masked and "quality" in init_stages and cfg.quality_steps > 0:
        plan["quality_samples"] = len(dataset)
        plan["quality"] = cfg.quality_steps
    if cfg.train_multipathnet and dataset.instances and cfg.multipathnet_steps > 0:
        plan["proposals"] = len(dataset)
        plan["multipathnet"] = cfg.multipathnet_steps
    plan["saving"] = 1
    return plan


def write_checkpoint(model: SegmentationModel, out: Path, meta: dict, compact: bool) -> Path:
    """``save_checkpoint`` into ``out`` (created when missing). Each file is written atomically, the JSON
    last; if writing fails, the weights file is removed again (and ``out`` when this call created it), so a
    failed job leaves no checkpoint, not even half of one."""
    created = not out.exists()
    try:
        return save_checkpoint(model.eval(), out, meta, compact=compact)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            (out / WEIGHTS_FILE).unlink(missing_ok=True)
        raise


def finetune(
    init: Path,
    data: Path,
    out: Path,
    cfg: FinetuneConfig | None = None,
    train_image_ids: list[int] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Fine-tune the checkpoint ``init`` on the COCO-format directory ``data`` (only the images
    ``train_image_ids`` when given) and write the result to ``out``; returns ``out``.

    Stages and classes as in the module docstring. ``out`` may not exist yet; it must not hold a checkpoint
    already (``FileExistsError``). Nothing is written to it before training has finished, and the checkpoint
    files appear atomically, so a job that fails (or is killed) leaves no checkpoint there.

    ``progress(stage, fraction)``: called when a stage starts (``loading``, ``deepmask``, ``sharpmask``,
    ``clicks``, ``first-click``, ``quality_samples``, ``quality``, ``proposals``, ``multipathnet``,
    ``saving``) and after
    every 1% of the whole job, with the fraction of the job done (weighted by expected time), which never
    decreases and ends at exactly 1.0; an exception it raises aborts the job (nothing is written). A tqdm
    bar shows the same.

    The checkpoint's metadata keeps the ``training`` record of ``init`` and adds ``training.finetune``: init
    path and version, data path, image ids, instance counts, classes kept/new, steps and seconds per stage,
    final losses, the configuration and the hardware.
    """
    cfg = cfg or FinetuneConfig()
    started = time.monotonic()
    init, data, out = Path(init), Path(data), Path(out)
    if (out / METADATA_FILE).exists() or (out / WEIGHTS_FILE).exists():
        raise FileExistsError(f"{out} already holds a checkpoint")
    dataset = CocoInstances(data, "all", image_ids=train_image_ids)
    if not dataset.instances:
        raise ValueError(f"no usable instance in {data} (images {train_image_ids or 'all'})")
    init_stages = read_metadata(init).get("stages", [])
    plan = plan_stages(cfg, init_stages, dataset)
    job = JobProgress(plan, progress)
    try:
        job.start("loading")
        torch.manual_seed(cfg.seed)
        model, init_meta = load_checkpoint(init, resolve_device(cfg.device))
        job.advance()
        record = run_stages(model, init_stages, dataset, cfg, plan, job)
        job.start("saving")
        record.update(
            init=str(init.resolve()),
            init_version=checkpoint_version(init),
            data=str(data.resolve()),
            config=asdict(cfg),
        )
        record["seconds"]["total"] = time.monotonic() - started
        meta = {
            "stages": [s for s in FINETUNE_STAGES if s in init_stages or s in record["stages"]],
            "training": {**init_meta.get("training", {}), "finetune": record},
            "metrics": {},
        }
        write_checkpoint(model, out, meta, cfg.compact)
        job.finish()
    finally:
        job.close()
    log.info(
        "fine-tuned %s on %d images (%d instances) in %.0f s -> %s",
        record["init_version"],
        len(dataset),
        len(dataset.instances),
        time.monotonic() - started,
        out,
    )
    return out


def run_stages(
    model: SegmentationModel,
    init_stages: Sequence[str],
    dataset: CocoInstances,
    cfg: FinetuneConfig,
    plan: dict[str, int],
    job: JobProgress,
) -> dict:
    """Train the stages of ``plan`` in order and give ``model`` the data's label set (:func:`remap_classes`,
    when it has or will train a MultiPathNet). Returns the training record: image ids, instance counts,
    classes kept and new, stages, steps, seconds and final losses per stage, hardware."""
    data = dataset.root
    seconds: dict[str, float] = {}
    losses: dict[str, dict[str, float]] = {}
    for stage in ("deepmask", "sharpmask"):
        if stage in plan:
            t0 = time.monotonic()
            losses[stage] = train_mask_stage(model, dataset, cfg.stage_config(stage, data), job)
            seconds[stage] = time.monotonic() - t0
    for stage in ("clicks", "first-click"):
        if stage in plan:
            t0 = time.monotonic()
            losses[stage] = train_click_stage(model, stage, dataset, cfg, job)
            seconds[stage] = time.monotonic() - t0
    if "quality" in plan:
        t0 = time.monotonic()
        losses["quality"] = train_quality_stage(model, "sharpmask" in init_stages, dataset, cfg, job)
        seconds["quality"] = time.monotonic() - t0
    kept: list[str] = []
    if model.multipathnet is not None or "multipathnet" in plan:
        names, ids = class_list(dataset)
        kept = remap_classes(model, names, ids)
        log.info("classes %s; kept the rows of %s", names, kept)
    if "multipathnet" in plan:
        t0 = time.monotonic()
        stage_cfg = cfg.stage_config("multipathnet", data)
        losses["multipathnet"] = train_label_stage(model, "sharpmask" in init_stages, dataset, stage_cfg, job)
        seconds["multipathnet"] = time.monotonic() - t0
    trained = [s for s in FINETUNE_STAGES if s in plan]
    return {
        "image_ids": [im["id"] for im in dataset.images],
        "instances": len(dataset.instances),
        "instances_with_mask": sum(inst.has_mask for inst in dataset.instances),
        "classes": {"kept": kept, "new": [n for n in model.config.classes if n not in kept]},
        "stages": trained,
        "steps": {s: plan[s] for s in trained},
        "seconds": seconds,
        "final_losses": losses,
        "hardware": f"{platform.machine()} {resolve_device(cfg.device)} x{torch.get_num_threads()} threads",
    }


# ---- old vs new ----------------------------------------------------------------------------------------
def heldout_instances(dataset: CocoInstances) -> list[list[Instance]]:
    """Per image, the instances :func:`compare` evaluates: non-crowd, area > 32^2 px (as ``segmask
    evaluate``); box-only ones count for labels only."""
    return [[inst for inst in insts if inst.area > MIN_AREA] for insts in dataset.instances_by_image]


def evaluate_checkpoint(path: Path, dataset: CocoInstances, device: str = "auto") -> dict:
    """Click mIoU and label top-1 of the checkpoint ``path`` on ``dataset``'s :func:`heldout_instances`.

    - click mIoU: one positive click at the interior point farthest from the boundary of each instance with
      a mask (``eval_interactive.evaluate_clicks``), IoU of the returned mask with the ground truth;
    - label top-1: MultiPathNet's argmax over its foreground classes on each instance's mask (or annotated
      box) and its tight box, right when its class NAME equals the instance's category name
      case-insensitively (the two checkpoints' label sets differ). A checkpoint without MultiPathNet, or whose
      label set lacks the category, is wrong on it.

    Returns ``{"version", "click_miou", "click_n", "label_top1", "label_n"}`` (rates None without instances).
    """
    predictor = load_predictor(path, resolve_device(device))
    category = {cid: name.lower() for cid, name in dataset.categories.items()}
    classes = [name.lower() for name in predictor.classes]
    ious: list[float] = []
    hits: list[bool] = []
    for index, instances in enumerate(heldout_instances(dataset)):
        if not instances:
            continue
        predictor.set_image(dataset.image(index))
        for inst in instances:
            if inst.has_mask:
                ious.append(evaluate_clicks(predictor, dataset.mask(inst), max_clicks=1)[1][0])
        if predictor.model.multipathnet is None:
            hits += [False] * len(instances)
            continue
        boxes = np.stack([instance_box(dataset, inst) for inst in instances])
        probs, _ = predictor.classify(boxes, [instance_region(dataset, inst) for inst in instances])
        predicted = probs[:, 1:].argmax(axis=1)
        hits += [
            classes[k] == category[inst.category_id] for k, inst in zip(predicted, instances, strict=True)
        ]
    return {
        "version": checkpoint_version(path),
        "click_miou": float(np.mean(ious)) if ious else None,
        "click_n": len(ious),
        "label_top1": float(np.mean(hits)) if hits else None,
        "label_n": len(hits),
    }


def decide(old: dict, new: dict, n_instances: int) -> tuple[bool, str, dict[str, float | None]]:
    """The publishing rule of :func:`compare`: ``(better_or_equal, reason, deltas new - old)``."""
    deltas: dict[str, float | None] = {
        key: None if old[key] is None or new[key] is None else new[key] - old[key]
        for key in ("click_miou", "label_top1")
    }
    if n_instances < MIN_COMPARE_INSTANCES:
        return True, f"held-out slice too small ({n_instances} instances): not compared, not blocked", deltas
    tolerance = {
        "click_miou": TOLERANCE,
        "label_top1": max(TOLERANCE, 1.0 / max(new["label_n"], 1)),
    }
    # The rounding margin keeps "exactly one instance" (e.g. 0.48 - 0.50 in floating point) within tolerance.
    worse = [k for k, d in deltas.items() if d is not None and d < -tolerance[k] - ROUNDING]
    better = [k for k, d in deltas.items() if d is not None and d > tolerance[k] + ROUNDING]
    click = deltas["click_miou"]
    if click is not None and click < -MAX_CLICK_DROP:
        return False, f"click mIoU dropped by {-click:.3f} (> {MAX_CLICK_DROP})", deltas
    if worse and not better:
        return False, f"worse on {', '.join(worse)} and better on nothing", deltas
    if worse:
        return True, f"worse on {', '.join(worse)} but better on {', '.join(better)}", deltas
    return True, "better on " + ", ".join(better) if better else "no measure worse than its tolerance", deltas


def compare(old: Path, new: Path, data: Path, image_ids: list[int], device: str = "auto") -> dict:
    """Evaluate the checkpoints ``old`` and ``new`` on the held-out images ``image_ids`` of the COCO-format
    directory ``data`` (:func:`evaluate_checkpoint`: one-click mIoU, label top-1 by class name) and decide
    whether ``new`` may replace ``old``.

    Decision (``better_or_equal``): a measure is *worse* when it dropped by more than its tolerance and
    *better* when it rose by more: 0.01 for click mIoU; for label top-1 one instance's worth (1/n, at least
    0.01), so that a single flipped label on a small slice is not a verdict. ``new`` is published unless

    - click mIoU dropped by more than 0.05 (clicks are every annotator's tool: no label gain pays for it), or
    - some measure got worse and none got better.

    A trade (one measure worse, the other better) publishes: fine-tuning exists to learn the project's labels,
    and the store keeps the old version to roll back to. With fewer than 5 held-out instances (or none) the
    comparison says nothing, so it does not block: ``better_or_equal`` is True and ``enough_data`` False.

    Returns ``{"old": {...}, "new": {...}, "delta": {"click_miou", "label_top1"}, "n_images", "n_instances",
    "image_ids", "enough_data", "better_or_equal", "reason"}``; the per-checkpoint dicts are those of
    :func:`evaluate_checkpoint` (rates None without instances, and then left out of the decision).
    """
    dataset = CocoInstances(data, "all", image_ids=image_ids)
    per_image = heldout_instances(dataset)
    n_instances = sum(len(insts) for insts in per_image)
    results = {
        "old": evaluate_checkpoint(old, dataset, device),
        "new": evaluate_checkpoint(new, dataset, device),
    }
    ok, reason, deltas = decide(results["old"], results["new"], n_instances)
    log.info(
        "old %s vs new %s on %d instances: %s (%s)", results["old"], results["new"], n_instances, ok, reason
    )
    return {
        **results,
        "delta": deltas,
        "n_images": sum(bool(insts) for insts in per_image),
        "n_instances": n_instances,
        "image_ids": [im["id"] for im in dataset.images],
        "enough_data": n_instances >= MIN_COMPARE_INSTANCES,
        "better_or_equal": ok,
        "reason": reason,
    }
