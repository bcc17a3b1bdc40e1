"""Fine-tuning on a project's annotations, the old-vs-new decision, box-only instances."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from segmodels import checkpoint
from segmodels.checkpoint import load_checkpoint
from segmodels.data import CocoInstances, WindowSampler
from segmodels.finetune import FinetuneConfig, compare, decide, finetune, remap_classes
from segmodels.predictor import DEFAULT_CHECKPOINT
from segmodels.train_multipathnet import roi_iou

# A project's label set: "Person" matches the shipped "person" (case-insensitively), "widget" is new and
# annotated, "gadget" is new and has no annotation.
CLASSES = ["Person", "widget", "gadget"]
# COCO128 images (all from the train split) and what their instances become in the project.
IMAGES = (36, 86, 326, 431)
RELABEL = {"person": 1, "umbrella": 2, "handbag": 2, "wine glass": 2}
TRAIN_IDS = [36, 86, 326]
TINY = FinetuneConfig(
    deepmask_steps=2,
    sharpmask_steps=2,
    click_steps=2,
    quality_steps=2,
    multipathnet_steps=3,
    batch_size=4,
    device="cpu",
    seed=0,
)


@pytest.fixture(scope="module")
def project(coco128: Path, tmp_path_factory) -> Path:
    """A Label Studio-like COCO directory: 4 COCO128 images, the label set :data:`CLASSES`, and the handbag
    of image 86 given as a box only (``"segmentation": []``)."""
    root = tmp_path_factory.mktemp("project")
    coco = json.loads((coco128 / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    (root / "images").mkdir()
    images = [im for im in coco["images"] if im["id"] in IMAGES]
    for im in images:
        shutil.copy(coco128 / "images" / im["file_name"], root / "images" / im["file_name"])
    annotations = []
    for ann in coco["annotations"]:
        name = names[ann["category_id"]]
        if ann["image_id"] in IMAGES and name in RELABEL and not ann["iscrowd"] and ann["area"] > 32**2:
            ann = {**ann, "category_id": RELABEL[name]}
            if name == "handbag":
                ann.update(segmentation=[], area=ann["bbox"][2] * ann["bbox"][3])
            annotations.append(ann)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "instances.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def tuned(project: Path, tmp_path_factory) -> tuple[Path, list[tuple[str, float]]]:
    """A few steps of every stage on the project's train images; the checkpoint and the progress calls."""
    out = tmp_path_factory.mktemp("versions") / "v2"
    calls: list[tuple[str, float]] = []
    finetune(DEFAULT_CHECKPOINT, project, out, TINY, TRAIN_IDS, lambda s, f: calls.append((s, f)))
    return out, calls


# ---- box-only instances ---------------------------------------------------------------------------------
def test_box_only_annotations_are_instances_without_a_mask(project: Path):
    data = CocoInstances(project, "all")
    box_only = [inst for inst in data.instances if not inst.has_mask]
    assert len(box_only) == 1 and data.images[box_only[0].image_index]["id"] == 86
    assert all(data.mask(inst).any() for inst in data.instances if inst.has_mask)


def test_box_only_instances_are_never_mask_targets(project: Path, monkeypatch):
    data = CocoInstances(project, "all")
    requested = []
    read = data.mask_u8
    monkeypatch.setattr(data, "mask_u8", lambda inst: requested.append(inst) or read(inst))
    WindowSampler(data, seed=1).mask_batch(200)
    assert requested and all(inst.has_mask for inst in requested)
    assert {inst.index for inst in requested} == {inst.index for inst in data.instances if inst.has_mask}


def test_data_with_only_boxes_trains_objectness_but_gives_no_mask_targets(project: Path, tmp_path: Path):
    coco = json.loads((project / "instances.json").read_text())
    for ann in coco["annotations"]:
        ann["segmentation"] = []
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    (tmp_path / "images").symlink_to(project / "images")
    sampler = WindowSampler(CocoInstances(tmp_path, "all"), seed=0)
    inputs, labels = sampler.score_batch(8)
    assert inputs.shape == (8, 3, 192, 192) and 0 < labels.sum() < 8
    with pytest.raises(ValueError, match="no instance .* has a mask"):
        sampler.mask_batch(1)


def test_box_only_instances_overlap_rois_by_box_iou():
    disc = np.zeros((20, 20), bool)
    disc[5:15, 5:15] = True
    boxes = np.array([[5, 5, 15, 15], [0, 0, 10, 10]], np.float32)
    iou = roi_iou([disc, None], boxes, [disc, None], np.array([[5, 5, 15, 15], [0, 0, 10, 10]], np.float32))
    assert iou[0, 0] == 1.0 and iou[1, 1] == 1.0
    assert iou[0, 1] == pytest.approx(25 / 175) and iou[1, 0] == pytest.approx(25 / 175)


def test_instances_can_be_restricted_to_image_ids(project: Path):
    data = CocoInstances(project, "all", image_ids=[86, 431])
    assert [im["id"] for im in data.images] == [86, 431]
    assert {data.images[inst.image_index]["id"] for inst in data.instances} == {86, 431}
    with pytest.raises(ValueError, match="not in"):
        CocoInstances(project, "all", image_ids=[86, 7])


# ---- classes --------------------------------------------------------------------------------------------
def test_classes_that_persist_keep_their_rows_and_new_ones_are_fresh():
    model, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    old = model.multipathnet
    person = model.config.classes.index("person") + 1
    assert remap_classes(model, CLASSES, [1, 2, 3]) == ["Person"]
    new = model.multipathnet
    assert model.config.classes == CLASSES and model.config.class_ids == [1, 2, 3]
    for new_head, old_head in zip(new.classifiers, old.classifiers, strict=True):
        assert torch.equal(new_head.weight[[0, 1]], old_head.weight[[0, person]])
        assert torch.equal(new_head.bias[[0, 1]], old_head.bias[[0, person]])
        assert new_head.weight[2:].abs().max() < 0.1 and torch.equal(new_head.bias[2:], torch.zeros(2))
    old_box = old.box_head.weight.view(-1, 4, old.box_head.weight.shape[1])
    assert torch.equal(new.box_head.weight[4:8], old_box[person])
    assert torch.equal(new.shared[0].weight, old.shared[0].weight)


# ---- finetune -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_finetune_writes_a_checkpoint_of_the_datasets_classes(tuned, project: Path):
    out, _ = tuned
    model, meta = load_checkpoint(out)
    assert model.config.classes == CLASSES and model.config.class_ids == [1, 2, 3]
    record = meta["training"]["finetune"]
    assert record["image_ids"] == TRAIN_IDS and record["stages"] == [
        "deepmask",
        "sharpmask",
        "clicks",
        "quality",
        "multipathnet",
    ]
    assert record["steps"] == {"deepmask": 2, "sharpmask": 2, "clicks": 2, "quality": 2, "multipathnet": 3}
    assert record["classes"] == {"kept": ["Person"], "new": ["widget", "gadget"]}
    assert record["data"] == str(project.resolve()) and record["seconds"]["total"] > 0
    assert meta["stages"] == ["deepmask", "sharpmask", "clicks", "quality", "multipathnet"]
    assert "deepmask" in meta["training"] and "version" not in meta


@pytest.mark.slow
def test_finetune_trains_the_click_head(tuned):
    out, _ = tuned
    before, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    after, _ = load_checkpoint(out)
    changed = [
        not torch.equal(after.click_head.state_dict()[k], v)
        for k, v in before.click_head.state_dict().items()
        if v.is_floating_point()
    ]
    assert any(changed)


@pytest.mark.slow
def test_finetune_trains_the_quality_head_on_its_own_standardisation(tuned):
    out, _ = tuned
    before, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    after, _ = load_checkpoint(out)
    old, new = before.quality_head.state_dict(), after.quality_head.state_dict()
    assert torch.equal(new["shift"], old["shift"]) and torch.equal(new["scale"], old["scale"])
    assert any(not torch.equal(new[k], old[k]) for k in old if k.startswith("mlp."))


@pytest.mark.slow
def test_finetune_keeps_the_rows_of_persisting_classes(tuned):
    old, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    new, _ = load_checkpoint(tuned[0])
    person = old.config.classes.index("person") + 1
    w_old = old.multipathnet.classifiers[0].weight
    w_new = new.multipathnet.classifiers[0].weight
    cosine = torch.nn.functional.cosine_similarity
    # A few Adam steps move every weight a little: the kept rows stay close to where they were.
    assert cosine(w_new[1], w_old[person], dim=0) > 0.9
    assert cosine(w_new[0], w_old[0], dim=0) > 0.9


@pytest.mark.slow
def test_finetune_reports_progress_up_to_one(tuned):
    _, calls = tuned
    fractions = [f for _, f in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and 0.0 <= fractions[0] < 0.1
    stages = list(dict.fromkeys(s for s, _ in calls))
    assert stages == [
        "loading",
        "deepmask",
        "sharpmask",
        "clicks",
        "quality_samples",
        "quality",
        "proposals",
        "multipathnet",
        "saving",
    ]


def test_a_failure_midway_leaves_nothing_at_out(project: Path, tmp_path: Path):
    def fail(stage: str, fraction: float) -> None:
        if stage == "sharpmask":
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        finetune(DEFAULT_CHECKPOINT, project, tmp_path / "new", TINY, TRAIN_IDS, fail)
    assert not (tmp_path / "new").exists()
    staged = tmp_path / "staged"
    (staged / "data").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="cancelled"):
        finetune(DEFAULT_CHECKPOINT, project, staged, TINY, TRAIN_IDS, fail)
    assert [p.name for p in staged.iterdir()] == ["data"]


def test_a_failure_while_writing_leaves_no_half_checkpoint(project: Path, tmp_path: Path, monkeypatch):
    def broken(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "atomic_write_json", broken)
    nothing = FinetuneConfig(
        train_deepmask=False, train_sharpmask=False, train_clicks=False, train_multipathnet=False
    )
    (tmp_path / "staged").mkdir()
    with pytest.raises(OSError, match="disk full"):
        finetune(DEFAULT_CHECKPOINT, project, tmp_path / "staged", nothing)
    assert list((tmp_path / "staged").iterdir()) == []
    with pytest.raises(OSError, match="disk full"):
        finetune(DEFAULT_CHECKPOINT, project, tmp_path / "fresh", nothing)
    assert not (tmp_path / "fresh").exists()


def test_finetune_refuses_to_overwrite_a_checkpoint(project: Path):
    with pytest.raises(FileExistsError):
        finetune(DEFAULT_CHECKPOINT, project, DEFAULT_CHECKPOINT, TINY)


# ---- compare --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_returns_both_evaluations_and_does_not_block_on_a_tiny_slice(tuned, project: Path):
    result = compare(DEFAULT_CHECKPOINT, tuned[0], project, [326, 431], device="cpu")
    assert set(result) >= {"old", "new", "n_instances", "better_or_equal", "enough_data", "reason", "delta"}
    assert result["n_instances"] == 3 and result["image_ids"] == [326, 431]
    assert result["better_or_equal"] and not result["enough_data"]
    for side in ("old", "new"):
        assert set(result[side]) == {"version", "click_miou", "click_n", "label_top1", "label_n"}
        assert result[side]["click_n"] == 3 and result[side]["label_n"] == 3
        assert 0.0 <= result[side]["click_miou"] <= 1.0
        assert result[side]["label_top1"] * 3 == pytest.approx(round(result[side]["label_top1"] * 3))
    assert result["delta"]["click_miou"] == pytest.approx(
        result["new"]["click_miou"] - result["old"]["click_miou"]
    )
    json.dumps(result)


def test_compare_on_an_empty_slice_does_not_block(project: Path):
    result = compare(DEFAULT_CHECKPOINT, DEFAULT_CHECKPOINT, project, [], device="cpu")
    assert result["better_or_equal"] and not result["enough_data"] and result["n_instances"] == 0
    assert result["old"]["click_miou"] is None and result["new"]["label_n"] == 0


def _measures(click: float | None, top1: float | None, n: int = 50) -> dict:
    return {"click_miou": click, "label_top1": top1, "label_n": n}


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (_measures(0.50, 0.50), _measures(0.50, 0.50), True),  # nothing changed
        (_measures(0.50, 0.50), _measures(0.495, 0.50), True),  # within the click tolerance
        (_measures(0.50, 0.50), _measures(0.48, 0.50), False),  # clicks worse, labels no better
        (_measures(0.50, 0.50), _measures(0.48, 0.60), True),  # a trade: labels pay for a small drop
        (_measures(0.50, 0.50), _measures(0.44, 0.90), False),  # no label gain pays for a big click drop
        (_measures(0.50, 0.50), _measures(0.50, 0.44), False),  # labels worse by 3 instances of 50
        (_measures(0.50, 0.50), _measures(0.50, 0.48), True),  # one instance of 50: noise
        (_measures(0.50, 0.50), _measures(0.52, 0.44), True),  # the other trade
        (_measures(None, 0.50), _measures(None, 0.40), False),  # box-only data: labels alone decide
    ],
)
def test_decision_rule(old: dict, new: dict, expected: bool):
    assert decide(old, new, 50)[0] is expected


def test_a_tiny_or_empty_slice_never_blocks():
    ok, reason, _ = decide(_measures(0.9, 0.9), _measures(0.1, 0.1), 0)
    assert ok and "too small" in reason


@pytest.mark.slow
def test_finetune_trains_a_first_click_head_when_the_checkpoint_has_one(
    project: Path, coco128, tmp_path: Path
):
    from dataclasses import replace

    from segmodels.train_clicks import ClickTrainConfig, train_click_head

    with_head = train_click_head(
        ClickTrainConfig(
            str(coco128), str(DEFAULT_CHECKPOINT), str(tmp_path / "init"), split="tune", steps=1
        ),
        first_click=True,
    )
    only_clicks = replace(TINY, train_deepmask=False, train_sharpmask=False, train_quality=False)
    only_clicks = replace(only_clicks, train_multipathnet=False)
    out = tmp_path / "v2"
    finetune(with_head, project, out, only_clicks, TRAIN_IDS)
    before, _ = load_checkpoint(with_head)
    after, meta = load_checkpoint(out)
    assert meta["training"]["finetune"]["stages"] == ["clicks", "first-click"]
    assert "first-click" in meta["stages"]
    old, new = before.first_click_head.state_dict(), after.first_click_head.state_dict()
    assert any(not torch.equal(new[k], v) for k, v in old.items() if v.is_floating_point())
