"""The raw data contract: what a user brings in ``data/`` (see README "Data format").

data/sites/<site>/metadata.csv   one row per pre-training image
data/tasks/<task>/metadata.csv   one row per downstream image
Paths are relative to the folder holding the CSV and may not leave it.
"""

from __future__ import annotations

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
