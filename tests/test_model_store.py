"""The versioned model store: immutable numbered versions, an atomic current pointer, rollback."""

import json
import shutil

import pytest

from segmodels.checkpoint_files import checkpoint_version
from segmodels.model_store import ModelStore
from segmodels.predictor import DEFAULT_CHECKPOINT


def _add_copy_of_default(store: ModelStore) -> str:
    with store.new_version() as staged:
        for name in ("model.safetensors", "model.json"):
            shutil.copy(DEFAULT_CHECKPOINT / name, staged.path / name)
    return staged.name


@pytest.fixture
def store(tmp_path):
    return ModelStore(tmp_path / "store", DEFAULT_CHECKPOINT)


def test_an_empty_store_serves_the_fallback(store):
    assert store.current_dir() == DEFAULT_CHECKPOINT
    assert store.current_version() == checkpoint_version(DEFAULT_CHECKPOINT)


def test_versions_are_numbered_and_carry_their_name_in_the_metadata(store):
    assert [_add_copy_of_default(store), _add_copy_of_default(store)] == ["v1", "v2"]
    assert json.loads((store.get("v2") / "model.json").read_text())["version"] == "v2"
    assert checkpoint_version(store.get("v2")) == "v2"


def test_a_new_version_is_not_served_until_published(store):
    name = _add_copy_of_default(store)
    assert store.current_version() != name
    store.publish(name, "test")
    assert store.current_version() == name and store.current_dir() == store.get(name)


def test_a_failed_build_leaves_no_version_and_no_staging(store):
    with pytest.raises(RuntimeError), store.new_version() as staged:
        (staged.path / "model.json").write_text("{}")
        raise RuntimeError("killed mid-way")
    assert store.versions()[1:] == []
    assert list((store.root / "staging").iterdir()) == []


def test_staging_left_by_a_dead_process_is_removed(store):
    import socket

    dead = store.root / "staging" / f"{socket.gethostname()}-999999-abc"
    dead.mkdir(parents=True)
    _add_copy_of_default(store)
    assert not dead.exists()


def test_rollback_switches_back_and_is_recorded(store):
    first, second = _add_copy_of_default(store), _add_copy_of_default(store)
    store.publish(first, "test")
    store.publish(second, "test")
    store.rollback(first)
    assert store.current_version() == first
    store.rollback(checkpoint_version(DEFAULT_CHECKPOINT))
    assert store.current_dir() == DEFAULT_CHECKPOINT
    history = [json.loads(line) for line in (store.root / "history.jsonl").read_text().splitlines()]
    assert [h["version"] for h in history] == [first, second, first, None]


def test_unknown_versions_are_refused_with_the_known_ones(store):
    _add_copy_of_default(store)
    with pytest.raises(KeyError, match="v1"):
        store.rollback("v7")


def test_listing_marks_current_and_published(store):
    published, unpublished = _add_copy_of_default(store), _add_copy_of_default(store)
    store.publish(published, "test")
    rows = {v.name: v for v in store.versions()}
    assert rows[published].current and rows[published].published
    assert not rows[unpublished].current and not rows[unpublished].published


def test_without_a_root_the_store_is_read_only(tmp_path):
    store = ModelStore(None, DEFAULT_CHECKPOINT)
    assert store.current_dir() == DEFAULT_CHECKPOINT
    with pytest.raises(PermissionError, match="SEGMASK_MODEL_STORE"), store.new_version():
        pass


def test_a_read_only_store_refuses_unknown_versions_and_rollbacks():
    store = ModelStore(None, DEFAULT_CHECKPOINT)
    assert store.get(checkpoint_version(DEFAULT_CHECKPOINT)) == DEFAULT_CHECKPOINT
    with pytest.raises(KeyError, match="v3"):
        store.get("v3")
    with pytest.raises(PermissionError, match="SEGMASK_MODEL_STORE"):
        store.rollback(checkpoint_version(DEFAULT_CHECKPOINT))
