"""The report of ``segmask evaluate``: its tables (plain text and Markdown), figures (matplotlib, Agg) and
files: ``metrics.json``, ``table.txt``, ``report.md`` and the PNGs it shows.

Figures draw images ``(H, W, 3) uint8 RGB`` with masks ``bool (H, W)``; points ``(x, y)`` and boxes ``[x1, y1,
x2, y2]`` are in pixel edge coordinates (pixel (row r, column c) has its centre at ``(c + 0.5, r + 0.5)``,
which matplotlib's ``imshow`` draws at ``(c, r)``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segmodels.coco_scoring import COCO_STATS
from segmodels.data import CocoInstances
from segmodels.eval_detection import PR_COLUMNS
from segmodels.eval_interactive import (
    MAX_CLICKS,
    MIN_AREA,
    NOC_THRESHOLDS,
    REPORTED_CLICKS,
    SIZES,
    THRESHOLDS,
    InstanceResult,
)
from segmodels.eval_labels import FREQUENT_CLASS
from segmodels.eval_patches import PATCH_THRESHOLDS
from segmodels.eval_proposals import TOP_PROPOSALS
from segmodels.export import draw_detections
from segmodels.geometry import mask_iou, mask_to_box, rle_to_mask
from segmodels.predictor import Detection, MaskPredictor

EXAMPLES_PER_GROUP = 4
# The click-sequence figure: objects shown, and after how many clicks.
SEQUENCE_EXAMPLES = 4
SEQUENCE_STEPS = (1, 2, 3, 5, 10)


# ---- tables ---------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or value < 0 else f"{value:.{digits}f}"


def tables(metrics: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables as ``(title, headers, rows)`` of strings, from the metrics dict."""
    out = []
    summary = metrics.get("instances", {}).get("summary")
    if summary:
        rows = []
        for method, entry in summary.items():
            for size in SIZES:
                stats = entry[size]
                rows.append(
                    [
                        method if size == "all" else "",
                        size,
                        str(stats["n"]),
                        _fmt(stats["miou"]),
                        _fmt(stats.get("se")),
                        *(_fmt(stats[f"success@{t}"]) for t in THRESHOLDS),
                        _fmt(entry["median_seconds"]) if size == "all" else "",
                    ]
                )
        headers = ["method", "size", "n", "mIoU", "SE", *(f"IoU>={t}" for t in THRESHOLDS), "median s/object"]
        out.append(("Instances (clicks, box prompt, baselines)", headers, rows))
    converged = metrics.get("instances", {}).get("convergence")
    if converged:
        out.append(convergence_table(converged))
    proposals = metrics.get("proposals")
    if proposals:
        names = [s for s in COCO_STATS if s.startswith("AR")]
        rows = [[iou_type, *(_fmt(proposals[iou_type][s]) for s in names)] for iou_type in ("segm", "bbox")]
        title = (
            f"Proposals: top {proposals['k']} per image, {proposals['images']} images, "
            f"median {proposals['median_seconds_per_image']:.2f} s/image"
        )
        out.append((title, ["type", *names], rows))
    out += label_tables(metrics.get("labels"))
    detection = metrics.get("detection")
    if detection:
        names = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"]
        rows = [[iou_type, *(_fmt(detection[iou_type][s]) for s in names)] for iou_type in ("segm", "bbox")]
        seconds = detection["median_seconds_per_image"]
        title = (
            f"Detection: COCO AP with categories, {detection['images']} images, score >= "
            f"{detection['score_threshold']:g}, <= {detection['max_detections']} per image; "
            f"{detection['mean_detections_at_default']:.1f} per image at the defaults (score >= "
            f"{detection['default_threshold']:g}, <= {detection['default_max_detections']} per image; "
            f"precision {_fmt(detection['precision_at_default'])}, "
            f"{_fmt(detection['mask_precision_at_default'])} whatever the label; recall "
            f"{_fmt(detection['recall_at_default'])})"
            + (f", median {seconds:.2f} s/image" if seconds is not None else "")
        )
        out.append((title, ["type", *names], rows))
        rows = [
            [
                "no cap" if r["max_detections"] >= detection["max_detections"] else str(r["max_detections"]),
                f"{r['per_image']:.2f}",
                *(_fmt(r[k]) for k in PR_COLUMNS),
            ]
            for r in detection.get("at_caps", [])
        ]
        headers = [
            "at most",
            "per image",
            "precision",
            "precision, any label",
            "added ones, any label",
            "recall (> 32^2)",
        ]
        title = (
            f"Pre-annotation by detections per image (SEGMASK_MAX_DETECTIONS), score >= "
            f"{detection['default_threshold']:g}"
        )
        out.append((title, headers, rows))
        out.append(before_after_table(detection))
    patches = metrics.get("patches")
    if patches:
        names = ["mean_iou", *(f"success@{t}" for t in PATCH_THRESHOLDS)]
        rows = [[stage, str(v["n"]), *(_fmt(v[s]) for s in names)] for stage, v in patches.items()]
        out.append(("Patches (evalPerPatch)", ["stage", "n", *names], rows))
    return out


def before_after_table(detection: dict) -> tuple[str, list[str], list[list[str]]]:
    """Pre-annotation before (uncalibrated ``detection_scores``, one per image) and after (the checkpoint's
    scores, every one at the default threshold): precision, recall, instances found per image, segm AP/AP50
    and, for the scores, the expected calibration error and wrong detections at >= ``confident``."""
    before = detection["before"]
    confident = detection["confident"]
    rows = [
        [
            f"before: detection_scores, <= {before['max_detections']} per image",
            f"{before['per_image']:.2f}",
            _fmt(before["precision"]),
            _fmt(before["recall"]),
            f"{before['found_per_image']:.2f}",
            _fmt(before["segm"]["AP"]),
            _fmt(before["segm"]["AP50"]),
            "-",
            "-",
        ],
        [
            "after: "
            + ("calibrated probability" if detection["calibrated"] else "detection_scores (no calibration)"),
            f"{detection['mean_detections_at_default']:.2f}",
            _fmt(detection["precision_at_default"]),
            _fmt(detection["recall_at_default"]),
            f"{detection['found_per_image_at_default']:.2f}",
            _fmt(detection["segm"]["AP"]),
            _fmt(detection["segm"]["AP50"]),
            _fmt(detection["reliability"]["ece"]),
            f"{detection['confident_wrong']} of {detection['confident_detections']}",
        ],
    ]
    headers = [
        "scores",
        "per image",
        "precision",
        "recall (> 32^2)",
        "found per image",
        "segm AP",
        "segm AP50",
        "ECE (all)",
        f"wrong at >= {confident:g}",
    ]
    title = f"Pre-annotation before and after, score >= {detection['default_threshold']:g}"
    return title, headers, rows


def convergence_table(converged: dict) -> tuple[str, list[str], list[list[str]]]:
    """The table of :func:`eval_interactive.convergence`: mIoU (standard error) after k interactions, NoC,
    never reached."""
    rows = []
    for name, by_size in converged.items():
        for size in SIZES:
            st = by_size[size]
            rows.append(
                [
                    name if size == "all" else "",
                    size,
                    str(st["n"]),
                    *(f"{_fmt(st[f'miou@{k}'])} ({_fmt(st[f'se@{k}'])})" for k in REPORTED_CLICKS),
                    *(_fmt(st[f"noc@{t}"], 2) for t in NOC_THRESHOLDS),
                    _fmt(st[f"never@{NOC_THRESHOLDS[0]}"]),
                ]
            )
    headers = [
        "sequence",
        "size",
        "n",
        *(f"mIoU@{k} (SE)" for k in REPORTED_CLICKS),
        *(f"NoC@{round(t * 100)}" for t in NOC_THRESHOLDS),
        f"never {NOC_THRESHOLDS[0]} in {MAX_CLICKS}",
    ]
    return f"Corrective clicks (simulated annotator, at most {MAX_CLICKS} interactions)", headers, rows


def label_tables(labels: dict | None) -> list[tuple[str, list[str], list[list[str]]]]:
    """The top-1 table (evaluated instances, all sizes) and the per-class table of
    :func:`eval_labels.label_summary`."""
    if not labels:
        return []
    rows = [
        [f"area > {MIN_AREA} px", str(labels["n"]), _fmt(labels["top1"])],
        ["all sizes", str(labels["all_sizes"]["n"]), _fmt(labels["all_sizes"]["top1"])],
    ]
    out = [("Labels: MultiPathNet top-1 on GT masks", ["instances", "n", "top-1"], rows)]
    if labels["per_class"]:
        rows = [
            [
                c["name"],
                str(c["n"]),
                _fmt(c["top1"]),
                f"{c['confusion']} ({c['confusion_n']})" if c["confusion"] else "-",
            ]
            for c in labels["per_class"]
        ]
        title = f"Labels per class (>= {FREQUENT_CLASS} instances, area > {MIN_AREA} px)"
        out.append((title, ["class", "n", "top-1", "most common confusion (n)"], rows))
    return out


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain text, columns aligned (first column left, the others right)."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first, *rest = zip(cells, widths, strict=True)
        return "  ".join([first[0].ljust(first[1]), *(c.rjust(w) for c, w in rest)]).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    return "\n".join(
        [
            "| " + " | ".join(headers) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|",
            *("| " + " | ".join(r) + " |" for r in rows),
        ]
    )


def format_tables(metrics: dict) -> str:
    """All tables as aligned plain text, with a header line naming the checkpoint and split."""
    head = (
        f"checkpoint {metrics['checkpoint']} | split {metrics['split']} "
        f"({len(metrics['image_ids'])} images) | {metrics['seconds']['total']:.0f} s"
    )
    return "\n\n".join([head, *(f"{title}\n{format_table(h, r)}" for title, h, r in tables(metrics))])


# ---- figures --------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overlay(
    ax,
    image: np.ndarray,
    gt: list[np.ndarray],
    pred: np.ndarray,
    title: str,
    crop: np.ndarray | None = None,
    clicks: Sequence[Sequence[float]] = (),
    box: np.ndarray | None = None,
) -> None:
    """Draw ``image`` with the GT outlines (green) and ``pred`` filled in red on ``ax``.

    ``crop``: xyxy region to show (whole image when None); ``clicks`` ``[x, y, label]`` (positive: green +,
    negative: red x); ``box``: the prompt box (yellow, dashed). All in pixel edge coordinates.
    """
    from matplotlib.patches import Rectangle

    height, width = image.shape[:2]
    x0, y0, x1, y1 = (0, 0, width, height) if crop is None else (int(v) for v in crop)
    ax.imshow(image[y0:y1, x0:x1])
    rgba = np.zeros((y1 - y0, x1 - x0, 4), np.float32)
    rgba[pred[y0:y1, x0:x1]] = (1.0, 0.0, 0.0, 0.45)
    ax.imshow(rgba)
    for g in gt:
        if g[y0:y1, x0:x1].any():
            ax.contour(g[y0:y1, x0:x1].astype(np.float32), levels=[0.5], colors="lime", linewidths=1.2)
    for x, y, label in clicks:
        ax.plot(
            x - x0 - 0.5,
            y - y0 - 0.5,
            "+" if label else "x",
            color="lime" if label else "red",
            markersize=10,
            markeredgewidth=2,
        )
    if box is not None:
        ax.add_patch(
            Rectangle(
                (box[0] - x0 - 0.5, box[1] - y0 - 0.5),
                box[2] - box[0],
                box[3] - box[1],
                fill=False,
                edgecolor="yellow",
                linestyle="--",
                linewidth=1,
            )
        )
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def context_crop(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """xyxy region around an object box (half its larger side + 16 px on each side), inside the image."""
    margin = 0.5 * max(box[2] - box[0], box[3] - box[1]) + 16
    return np.array(
        [
            max(0, np.floor(box[0] - margin)),
            max(0, np.floor(box[1] - margin)),
            min(width, np.ceil(box[2] + margin)),
            min(height, np.ceil(box[3] + margin)),
        ]
    )


def pick_examples(results: list[InstanceResult], iou_of) -> list[tuple[str, InstanceResult]]:
    """Up to :data:`EXAMPLES_PER_GROUP` best, median and worst results by ``iou_of(result)``."""
    ranked = sorted(results, key=iou_of, reverse=True)
    n, k = len(ranked), EXAMPLES_PER_GROUP
    if n <= 3 * k:
        return [("", r) for r in ranked]
    mid = n // 2 - k // 2
    return (
        [("best", r) for r in ranked[:k]]
        + [("median", r) for r in ranked[mid : mid + k]]
        + [("worst", r) for r in ranked[-k:]]
    )


def plot_instances(
    path: Path, dataset: CocoInstances, picks: list[tuple[str, InstanceResult]], key: str, title: str
) -> None:
    """A 4-column grid of instance overlays with the stored ``key`` prediction ("click" or "box")."""
    plt = _pyplot()
    index_of = {im["id"]: i for i, im in enumerate(dataset.images)}
    inst_of = {inst.annotation_id: inst for inst in dataset.instances}
    cols = 4
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(picks) :]:
        ax.axis("off")
    for ax, (group, r) in zip(axes.flat, picks, strict=False):
        image = dataset.image(index_of[r.image_id])
        gt = dataset.mask(inst_of[r.annotation_id])
        box = np.array(r.box)
        iou = r.click_ious[0] if key == "click" else r.box_iou
        name = dataset.categories[r.category_id]
        caption = f"{group} {name} ({r.size}) IoU {iou:.2f}".strip()
        overlay(
            ax,
            image,
            [gt],
            rle_to_mask(r.masks[key]),
            caption,
            crop=context_crop(box, *image.shape[:2]),
            clicks=r.clicks[:1] if key == "click" else (),
            box=box if key == "box" else None,
        )
    fig.suptitle(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_click_sequences(
    path: Path, predictor: MaskPredictor, dataset: CocoInstances, picks: list[InstanceResult]
) -> None:
    """One row per result: its simulated clicks replayed on ``predictor``, the mask after each of
    :data:`SEQUENCE_STEPS` clicks (red) against the GT (green), with the clicks so far."""
    plt = _pyplot()
    index_of = {im["id"]: i for i, im in enumerate(dataset.images)}
    inst_of = {inst.annotation_id: inst for inst in dataset.instances}
    cols = len(SEQUENCE_STEPS)
    fig, axes = plt.subplots(
        len(picks), cols, figsize=(3.4 * cols, 3.0 * len(picks)), squeeze=False, layout="constrained"
    )
    for row, r in zip(axes, picks, strict=True):
        image = dataset.image(index_of[r.image_id])
        gt = dataset.mask(inst_of[r.annotation_id])
        predictor.set_image(image)
        crop = context_crop(np.array(r.box), *image.shape[:2])
        for ax, k in zip(row, SEQUENCE_STEPS, strict=True):
            clicks = r.clicks[:k]
            points = [c[:2] for c in clicks]
            pred = predictor.segment(points, [int(c[2]) for c in clicks]).mask
            caption = (
                f"{dataset.categories[r.category_id]}: {len(clicks)} clicks, IoU {mask_iou(pred, gt):.2f}"
            )
            overlay(ax, image, [gt], pred, caption, crop=crop, clicks=clicks)
    fig.suptitle("Corrective clicks on held-out objects (+ positive, x negative): prediction red, GT green")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def sequence_examples(results: list[InstanceResult], n: int = SEQUENCE_EXAMPLES) -> list[InstanceResult]:
    """Up to ``n`` results whose first click was not yet good enough, the largest objects first: the ones
    where corrective clicks matter."""
    weak = [r for r in results if r.click_ious and r.click_ious[0] < NOC_THRESHOLDS[0]]
    return sorted(weak, key=lambda r: -r.area)[:n]


def plot_proposals(path: Path, dataset: CocoInstances, examples: dict[int, list[tuple[dict, float]]]) -> None:
    """Rows of 5 per image: its top proposals (red) with objectness and best IoU against the GT (green)."""
    plt = _pyplot()
    cols, rows_per_image = 5, -(-TOP_PROPOSALS // 5)
    rows = rows_per_image * len(examples)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, layout="constrained"
    )
    for n, (index, props) in enumerate(examples.items()):
        image = dataset.image(index)
        gts = [dataset.mask(inst) for inst in dataset.instances_by_image[index]]
        panels = axes[n * rows_per_image : (n + 1) * rows_per_image].flat
        for rank, ax in enumerate(panels):
            if rank >= len(props):
                ax.axis("off")
                continue
            rle, score = props[rank]
            pred = rle_to_mask(rle)
            best = max(mask_iou(pred, g) for g in gts)
            caption = f"image {dataset.images[index]['id']} #{rank + 1} s={score:.2f} IoU {best:.2f}"
            overlay(ax, image, gts, pred, caption)
    fig.suptitle("Top proposals (red) and GT instances (green); IoU = best match")
    fig.savefig(path, dpi=70)
    plt.close(fig)


def gt_detections(dataset: CocoInstances, index: int) -> list[Detection]:
    """The image's non-crowd instances as :class:`Detection` (score 1, tight mask box), for drawing."""
    out = []
    for inst in dataset.instances_by_image[index]:
        mask = dataset.mask(inst)
        name = dataset.categories.get(inst.category_id, str(inst.category_id))
        out.append(Detection(name, inst.category_id, 1.0, mask, mask_to_box(mask)))
    return out


def plot_reliability(path: Path, reliability: dict, title: str) -> None:
    """The reliability diagram of :func:`segmodels.calibration.reliability`'s data: per probability bin, the
    rate of right detections against the mean score (the diagonal is perfect calibration), and the count of
    detections per bin below."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True, layout="constrained"
    )
    edges = np.array(reliability["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    filled = [i for i, r in enumerate(reliability["rate"]) if r is not None]
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    top.bar(
        centres[filled],
        [reliability["rate"][i] for i in filled],
        width=np.diff(edges)[filled],
        edgecolor="black",
        alpha=0.6,
        label="rate of right detections",
    )
    top.plot(
        [reliability["mean_probability"][i] for i in filled],
        [reliability["rate"][i] for i in filled],
        "o-",
        color="tab:red",
        label="at the bin's mean score",
    )
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="right (IoU >= 0.5, its label)", title=title)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, reliability["count"], width=np.diff(edges), edgecolor="black", color="tab:blue")
    bottom.set(yscale="log", xlabel="score", ylabel="detections")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_detections(
    path: Path,
    dataset: CocoInstances,
    examples: dict[int, tuple[list[Detection], float | None]],
    threshold: float,
    limit: int,
) -> None:
    """A row per image: its GT instances and the detections at ``threshold`` and at most ``limit``
    (``export.draw_detections``), captioned with the image's top detection score
    (:func:`eval_detection.evaluate_detection`'s examples)."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(examples), 2, figsize=(10, 3.9 * len(examples)), squeeze=False, layout="constrained"
    )
    for (index, (detections, top)), (left, right) in zip(examples.items(), axes, strict=True):
        image = dataset.image(index)
        gt = gt_detections(dataset, index)
        image_id = dataset.images[index]["id"]
        left.imshow(draw_detections(image, gt, show_scores=False))
        left.set_title(f"image {image_id}: {len(gt)} GT instances", fontsize=9)
        right.imshow(draw_detections(image, detections))
        best = "no detection" if top is None else f"top score {top:.2f}"
        right.set_title(
            f"image {image_id}: {len(detections)} shown (score >= {threshold:g}, at most {limit}; {best})",
            fontsize=9,
        )
        for ax in (left, right):
            ax.axis("off")
    fig.suptitle("Detections at detect()'s defaults (right) and the GT (left)")
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---- files ----------------------------------------------------------------------------------------------
def write_report(
    out: Path,
    metrics: dict,
    predictor: MaskPredictor,
    dataset: CocoInstances,
    results: list[InstanceResult],
    examples: dict[int, list[tuple[dict, float]]],
    detection_examples: dict[int, tuple[list[Detection], float | None]],
) -> None:
    """``metrics.json``, ``table.txt``, ``report.md`` and its figures in ``out``, from the metrics and what
    the parts kept for the figures (instance results, proposal and detection examples). ``predictor``
    replays the click sequences of ``click-sequences.png``."""
    if results and results[0].click_ious:
        plot_click_sequences(out / "click-sequences.png", predictor, dataset, sequence_examples(results))
    write_markdown(out, metrics, dataset, results, examples, detection_examples)
    (out / "table.txt").write_text(format_tables(metrics) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def write_markdown(
    out: Path,
    metrics: dict,
    dataset: CocoInstances,
    results: list[InstanceResult],
    examples: dict[int, list[tuple[dict, float]]],
    detection_examples: dict[int, tuple[list[Detection], float | None]],
) -> None:
    """``clicks.png``, ``box.png``, ``proposals.png``, ``detections.png`` (those that have data) and
    ``report.md`` in ``out``."""
    figures = []
    if results and results[0].click_ious:
        picks = pick_examples(results, lambda r: r.click_ious[0])
        plot_instances(
            out / "clicks.png",
            dataset,
            picks,
            "click",
            "One click (+) at the GT's deepest point: prediction red, GT green",
        )
        figures.append(("One-click results (best, median, worst)", "clicks.png"))
        figures.append(("Corrective clicks converging", "click-sequences.png"))
    if results and results[0].box_iou is not None:
        picks = pick_examples(results, lambda r: r.box_iou)
        plot_instances(
            out / "box.png",
            dataset,
            picks,
            "box",
            "Tight GT box (yellow) as the prompt: prediction red, GT green",
        )
        figures.append(("Box-prompt results (best, median, worst)", "box.png"))
    if examples:
        plot_proposals(out / "proposals.png", dataset, examples)
        figures.append((f"Top-{TOP_PROPOSALS} proposals", "proposals.png"))
    detection = metrics.get("detection")
    if detection and "reliability" in detection:
        title = f"Reliability, {metrics['split']} split: ECE {detection['reliability']['ece']:.3f}"
        plot_reliability(out / "reliability.png", detection["reliability"], title)
        figures.append(("Reliability of the detection scores", "reliability.png"))
    if detection_examples:
        threshold, limit = (metrics["detection"][k] for k in ("default_threshold", "default_max_detections"))
        plot_detections(out / "detections.png", dataset, detection_examples, threshold, limit)
        figures.append((f"Detections (score >= {threshold:g}, at most {limit}) and GT", "detections.png"))
    instances = metrics.get("instances", {})
    lines = [
        f"# Evaluation: {metrics['split']} split",
        "",
        f"- command: `{metrics['command']}`",
        f"- checkpoint: `{metrics['checkpoint']}` (stages: {', '.join(metrics['checkpoint_stages'])})",
        f"- data: `{metrics['data']}`, {len(metrics['image_ids'])} images, "
        f"{instances.get('n', 0)} instances (non-crowd, area > 32^2)",
        f"- hardware: {metrics['hardware']['cpu']}, {metrics['hardware']['torch_threads']} torch threads, "
        f"device {metrics['hardware']['device']}",
        f"- total {metrics['seconds']['total']:.0f} s",
    ]
    if instances.get("median_feature_seconds") is not None:
        lines.append(
            f"- click/box times exclude the per-image feature pass (`set_image`): median "
            f"{instances['median_feature_seconds']:.3f} s per image"
        )
    if instances.get("grabcut_fallbacks"):
        lines.append(
            f"- GrabCut had no background for {instances['grabcut_fallbacks']} whole-image boxes: "
            "the filled box stands in"
        )
    for part, reason in metrics.get("skipped", {}).items():
        lines.append(f"- {part}: skipped ({reason})")
    labels = metrics.get("labels")
    if labels and labels["not_in_label_set"]:
        lines.append(
            f"- labels: {labels['not_in_label_set']} evaluated instances have a category the checkpoint's "
            "label set lacks (counted wrong)"
        )
    for title, headers, rows in tables(metrics):
        lines += ["", f"## {title}", "", markdown_table(headers, rows)]
    for title, name in figures:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
