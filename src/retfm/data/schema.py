"""The raw data contract: what a user brings in ``data/`` (see README "Data format").

data/sites/<site>/metadata.csv   one row per pre-training image
data/tasks/<task>/metadata.csv   one row per downstream image
Paths are relative to the folder holding the CSV and may not leave it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SEX = ("F", "M")
EYE = ("L", "R")
ETHNICITY = ("white", "black", "south_asian", "east_asian", "mixed", "other", "unknown")
SPLITS = ("train", "val", "test")

#: column -> dtype kind ("str", "float", "int"); required columns must be present and non-null.
SITE_REQUIRED = {
    "image_id": "str",
    "patient_id": "str",
    "path": "str",
    "age": "float",
    "sex": "str",
}
SITE_OPTIONAL = {
    "ethnicity": "str",
    "eye": "str",
    "camera": "str",
    "diagnosis": "str",  # free-text or grade; only summarised in data cards
}
TASK_REQUIRED = {
    "image_id": "str",
    "patient_id": "str",
    "path": "str",
    "label": "str",
    "split": "str",
    "source_site": "str",
}
TASK_OPTIONAL = {
    "age": "float",
    "sex": "str",
    "ethnicity": "str",
    "eye": "str",
    "camera": "str",
}


def age_band(age: float, edges: list[float]) -> str:
    """Label for the half-open band holding ``age``: edges [60] -> '<60' | '>=60'."""
    if age != age:  # NaN
        return "unknown"
    if not edges:
        return "all"
    if age < edges[0]:
        return f"<{edges[0]:g}"
    for lo, hi in zip(edges, edges[1:], strict=False):
        if lo <= age < hi:
            return f"{lo:g}-{hi - 1:g}"
    return f">={edges[-1]:g}" if len(edges) == 1 else f"{edges[-1]:g}+"


def age_band_labels(edges: Sequence[float]) -> list[str]:
    """Every label :func:`age_band` gives for ``edges``, youngest band first."""
    edges = [float(e) for e in edges]
    if not edges:
        return [age_band(0.0, edges)]
    return [age_band(a, edges) for a in (edges[0] - 1.0, *edges)]


def age_bands(ages: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Vectorised :func:`age_band`: one label per age (object array); NaN -> ``unknown``."""
    edges = [float(e) for e in edges]
    labels = np.array([*age_band_labels(edges), "unknown"], dtype=object)
    ages = np.asarray(ages, dtype=float)
    index = np.searchsorted(np.asarray(edges), ages, side="right")
    index[np.isnan(ages)] = len(labels) - 1
    return labels[index]
