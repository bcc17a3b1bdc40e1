"""Settings: one place for every environment variable, each documented in the README."""

from dataclasses import fields
from pathlib import Path

import pytest

from backend.settings import Settings
from segmodels.predictor import FEATURE_DTYPES, PREANNOTATION_MAX, PREANNOTATION_THRESHOLD

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults_are_embedded_mode_on_the_shipped_model_at_port_9090():
    settings = Settings.from_env({})
    assert settings.embedded and settings.port == 9090
    assert (settings.model_dir / "model.json").exists()


def test_environment_values_are_parsed_to_the_field_types():
    settings = Settings.from_env(
        {
            "SEGMASK_REDIS_URL": "redis://r:6379/2",
            "SEGMASK_INTERACTIVE_TIMEOUT": "7.5",
            "SEGMASK_MAX_DETECTIONS": "3",
            "SEGMASK_ALLOWED_HOSTS": "images.internal, 10.0.0.5,",
            "SEGMASK_MODEL_DIR": "/models/v3",
        }
    )
    assert not settings.embedded
    assert settings.interactive_timeout == 7.5 and settings.max_detections == 3
    assert settings.allowed_hosts == ("images.internal", "10.0.0.5")
    assert settings.model_dir == Path("/models/v3")


def test_pre_annotation_defaults_are_detects():
    settings = Settings.from_env({})
    assert (settings.score_threshold, settings.max_detections) == (PREANNOTATION_THRESHOLD, PREANNOTATION_MAX)


def test_an_unparseable_value_names_the_setting():
    with pytest.raises(ValueError, match="max_detections"):
        Settings.from_env({"SEGMASK_MAX_DETECTIONS": "many"})


def test_every_setting_is_documented_in_the_readme():
    readme = README.read_text()
    missing = [env for env, _, _ in Settings.documentation() if f"`{env}`" not in readme]
    assert missing == []


def test_a_value_outside_a_settings_choices_names_the_setting_and_the_choices():
    with pytest.raises(ValueError, match="FEATURE_PRECISION: .float64. is not one of float16, float32"):
        Settings.from_env({"SEGMASK_FEATURE_PRECISION": "float64"})


def test_the_feature_precision_choices_are_the_predictors():
    choices = next(f.metadata["choices"] for f in fields(Settings) if f.name == "feature_precision")
    assert sorted(choices) == sorted(FEATURE_DTYPES)
