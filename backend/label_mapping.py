"""One rule for mapping the model's class names onto a labelling project's label names (Label Studio
``<Label>``s and CVAT task labels alike).

A label claims the model classes listed in its ``predicted_values`` (comma-separated, case-insensitive),
first label first; every label then also claims the class spelled like its own name (case-insensitive),
unless an earlier rule already mapped that class. Classes no label claims are not in the mapping (their
objects are dropped).
"""

from __future__ import annotations

from collections.abc import Iterable


def class_to_label(labels: Iterable[tuple[str, str | None]]) -> dict[str, str]:
    """Lower-cased model class name -> label name, for ``labels`` given as ``(name, predicted_values)``
    pairs in the project's order (``predicted_values`` None or "" when the label has none)."""
    labels = list(labels)
    mapping: dict[str, str] = {}
    for name, predicted_values in labels:
        for cls in (predicted_values or "").split(","):
            if cls.strip():
                mapping.setdefault(cls.strip().lower(), name)
    for name, _ in labels:
        mapping.setdefault(name.lower(), name)
    return mapping
