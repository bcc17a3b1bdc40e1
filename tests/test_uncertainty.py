"""Image uncertainty for active learning: the expected label error on the project's classes only."""

import json
from pathlib import Path

import numpy as np
import pytest

from segmodels.data import CocoInstances
from segmodels.predictor import load_predictor
from segmodels.uncertainty import (
    detect_with_uncertainty,
    image_uncertainty,
    object_uncertainty,
    other_object_mass,
    project_columns,
)

# Columns: background, person, chair, cup (the project), giraffe (a class the project does not label).
MODEL_CLASSES = ["person", "chair", "cup", "giraffe"]
PROJECT = project_columns(MODEL_CLASSES, ["Person", "chair", "CUP"])


def test_the_projects_columns_follow_the_model_order_case_insensitively():
    assert PROJECT.tolist() == [1, 2, 3]
    assert project_columns(MODEL_CLASSES, None).tolist() == [1, 2, 3, 4]
    assert project_columns(MODEL_CLASSES, ["dog"]).tolist() == []


def test_only_doubt_between_the_projects_labels_counts():
    probs = np.array(
        [
            [0.05, 0.45, 0.45, 0.05, 0.00],  # a project object torn between person and chair
            [0.02, 0.94, 0.02, 0.02, 0.00],  # a confident person
            [0.50, 0.00, 0.50, 0.00, 0.00],  # chair or background: the old measure's favourite
            [0.00, 0.00, 0.45, 0.00, 0.55],  # chair or giraffe, a class outside the project
        ]
    )
    u = object_uncertainty(np.full(4, 0.9), probs, PROJECT)
    assert u == pytest.approx([0.45, 0.036, 0.0, 0.0])
    assert u[0] > u[1] > u[2] == u[3] == 0.0
    # A window on nothing: however torn MultiPathNet is, DeepMask's objectness says there is no object.
    assert object_uncertainty(np.array([0.9, 0.01]), probs[[0, 0]], PROJECT) == pytest.approx([0.45, 0.005])


def test_an_object_known_to_be_outside_the_project_counts_for_less():
    probs = np.array([[0.05, 0.45, 0.45, 0.05, 0.00]] * 3)
    other = np.array([0.0, 0.5, 1.0])
    assert object_uncertainty(np.full(3, 0.9), probs, PROJECT, other) == pytest.approx([0.45, 0.225, 0.0])


def test_the_imagenet_classifier_knows_animals_food_and_vehicles_a_project_does_not_label(coco128: Path):
    held_out = CocoInstances(coco128, "val")
    predictor = load_predictor(device="cpu")
    for name in ("dog", "airplane", "broccoli", "pizza"):
        largest = max(
            (i for i in held_out.instances if held_out.categories[i.category_id] == name),
            key=lambda i: i.area,
        )
        predictor.set_image(held_out.image(largest.image_index))
        mask = held_out.mask(largest)
        # To a project of people and chairs it is something else; to a project that labels it, it is not.
        assert other_object_mass(predictor, [mask], ["person", "chair"])[0] > 0.9, name
        assert other_object_mass(predictor, [mask], [name, "chair"])[0] < 0.1, name


def test_a_one_label_project_measures_doubt_about_its_object_and_no_label_measures_nothing():
    probs = np.array([[0.5, 0.5, 0.0, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    sure = np.ones(3)
    one = project_columns(MODEL_CLASSES, ["person"])
    assert object_uncertainty(sure, probs, one) == pytest.approx([0.5, 0.1, 0.0])
    assert object_uncertainty(sure, probs, project_columns(MODEL_CLASSES, [])).tolist() == [0.0, 0.0, 0.0]


def test_a_blank_image_is_less_uncertain_than_a_photo_and_one_pass_also_gives_detect(coco128: Path):
    predictor = load_predictor(device="cpu")
    photo = CocoInstances(coco128, "val")
    scores = []
    for image in (np.full((480, 640, 3), 128, np.uint8), photo.image(1)):
        predictor.set_image(image)
        measure = image_uncertainty(predictor)
        assert 0.0 <= measure["uncertainty"] <= 1.0
        assert measure["confidence"] == pytest.approx(1.0 - measure["uncertainty"])
        json.dumps(measure)
        scores.append(measure["uncertainty"])
    assert scores[0] < 0.05 < scores[1]
    detections, measure = detect_with_uncertainty(predictor)
    assert [(d.label, d.score) for d in detections] == [(d.label, d.score) for d in predictor.detect()]
    assert measure["detections"] == len(detections) and measure["uncertainty"] == scores[1]


def test_the_projects_classes_restrict_both_the_detections_and_the_measure(coco128: Path):
    predictor = load_predictor(device="cpu")
    predictor.set_image(CocoInstances(coco128, "val").image(1))
    project = ["person", "chair"]
    detections, measure = detect_with_uncertainty(predictor, classes=project)
    shown = predictor.detect(classes=project)
    assert [(d.label, d.score) for d in detections] == [(d.label, d.score) for d in shown]
    assert image_uncertainty(predictor, classes=project) == measure
    assert all(set(o["labels"]) <= set(project) for o in measure["objects"])
    # Per candidate, sum - max over a subset of the columns never exceeds it over all of them.
    assert measure["uncertainty"] <= image_uncertainty(predictor)["uncertainty"]
