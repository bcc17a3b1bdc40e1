"""Which model is served: the versioned store of the settings, and its views for `/versions` and the CLI."""

from __future__ import annotations

from backend.settings import Settings
from segmodels.model_store import ModelStore, VersionInfo


def open_store(settings: Settings) -> ModelStore:
    """The model store of ``settings`` (read-only, serving SEGMASK_MODEL_DIR, when none is configured)."""
    return ModelStore(settings.model_store or None, settings.model_dir)


def version_json(info: VersionInfo) -> dict:
    """One version as ``/versions`` and ``segmask versions --json`` show it."""
    return {
        "version": info.name,
        "current": info.current,
        "published": info.published,
        "created": info.created,
        "metrics": info.metrics,
        "path": str(info.path),
    }


def versions_json(store: ModelStore) -> dict:
    return {
        "current": store.current_version(),
        "store": str(store.root) if store.root else None,
        "versions": [version_json(v) for v in store.versions()],
    }
