"""The predictions contract and the subgroup columns every fairness analysis splits on.

A predictions frame has one row per test image::

    image_id, patient_id, y_true (int 0..K-1), prob_0 .. prob_{K-1} (rows sum to 1),
    [age (float), sex (F/M), ethnicity (str)]

:func:`add_groups` adds one ``group.<factor>`` column per grouping. Group columns live beside the
raw metadata instead of replacing it: the factor called ``age`` (bands at 60) must not overwrite
the ``age`` in years that finer bands and models still need. Missing metadata becomes the group
``unknown``, which is reported but kept out of fairness gaps (see ``fairness.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from retfm.data.schema import age_bands
from retfm.evaluation.metrics import check_arrays

GROUP_PREFIX = "group."
UNKNOWN = "unknown"
INTERSECTION = "*"  # in factor names: "age*sex"
GROUP_JOIN = " & "  # in intersection group labels: "<60 & F"
CATEGORICAL_FACTORS = ("sex", "ethnicity")
REQUIRED = ("image_id", "patient_id", "y_true")


def group_column(factor: str) -> str:
    """Name of the column holding ``factor``'s group labels: ``group.age``, ``group.age*sex``."""
    return f"{GROUP_PREFIX}{factor}"


def prob_columns(preds: pd.DataFrame) -> list[str]:
    """``prob_0 .. prob_{K-1}``, checked to be contiguous from 0."""
    k = 0
    while f"prob_{k}" in preds.columns:
        k += 1
    extra = [
        c
        for c in preds.columns
        if c.startswith("prob_") and c not in {f"prob_{i}" for i in range(k)}
    ]
    if k < 2 or extra:
        raise ValueError(
            f"predictions: expected probability columns prob_0..prob_(K-1) with K >= 2, "
            f"found {[c for c in preds.columns if c.startswith('prob_')]}"
        )
    return [f"prob_{i}" for i in range(k)]


def check_predictions(preds: pd.DataFrame) -> int:
    """Validate the predictions contract and return K; errors name the row's image_id and field."""
    missing = [c for c in REQUIRED if c not in preds.columns]
    if missing:
        raise ValueError(f"predictions: missing required column(s) {missing}")
    cols = prob_columns(preds)
    if preds["image_id"].duplicated().any():
        dup = preds.loc[preds["image_id"].duplicated(), "image_id"].iloc[0]
        raise ValueError(f"predictions: image_id {dup!r} appears more than once")
    for col in ("image_id", "patient_id", "y_true", *cols):
        if preds[col].isna().any():
            row = preds.index[preds[col].isna()][0]
            raise ValueError(
                f"predictions: row {row} (image_id {preds.loc[row, 'image_id']!r}): "
                f"{col} is missing"
            )
    try:
        check_arrays(preds["y_true"].to_numpy(), preds[cols].to_numpy(dtype=float))
    except ValueError as err:
        # Re-word "row <position>" with the image_id a user can search for.
        msg = str(err)
        pos = _row_from_message(msg)
        if pos is not None:
            msg = msg.replace(
                f"row {pos}", f"row {pos} (image_id {preds['image_id'].iloc[pos]!r})", 1
            )
        raise ValueError(f"predictions: {msg}") from None
    except TypeError as err:
        raise ValueError(f"predictions: y_true / prob columns must be numeric: {err}") from None
    return len(cols)


def _row_from_message(msg: str) -> int | None:
    parts = msg.split("row ", 1)
    if len(parts) < 2:
        return None
    digits = parts[1].split(":", 1)[0]
    return int(digits) if digits.isdigit() else None


def arrays(preds: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(y_true (n,), probs (n, K))`` from a validated predictions frame."""
    check_predictions(preds)
    return preds["y_true"].to_numpy().astype(int), preds[prob_columns(preds)].to_numpy(float)


def add_groups(
    preds: pd.DataFrame,
    age_bins: Mapping[str, list[float]],
    intersections: Iterable[str] = (),
) -> pd.DataFrame:
    """Copy of ``preds`` with a ``group.<factor>`` column per grouping.

    ``age_bins`` maps a factor name to band edges (``{"age": [60], "age_fine": [40, 60, 80]}``
    gives ``<60``/``>=60`` and ``<40``/``40-59``/``60-79``/``80+``, labelled by
    :func:`retfm.data.schema.age_band`); ``sex`` and ``ethnicity`` are added when present.
    ``intersections`` such as ``"age*sex"`` join existing factors' labels as ``"<60 & F"``.
    """
    out = preds.copy()
    if age_bins and "age" not in out.columns:
        raise ValueError(
            f"predictions: age bins {sorted(age_bins)} requested but there is no 'age' column"
        )
    for name, edges in age_bins.items():
        if list(edges) != sorted(edges):
            raise ValueError(f"age_bins.{name}: edges must increase, got {list(edges)}")
        ages = pd.to_numeric(out["age"], errors="coerce")
        out[group_column(name)] = pd.Series(
            age_bands(ages.to_numpy(dtype=float), edges), index=out.index, dtype=str
        )
    for name in CATEGORICAL_FACTORS:
        if name in out.columns:
            values = out[name].astype("string").str.strip().replace("", pd.NA)
            out[group_column(name)] = values.fillna(UNKNOWN).astype(str)
    for combo in intersections:
        parts = combo.split(INTERSECTION)
        absent = [p for p in parts if group_column(p) not in out.columns]
        if len(parts) < 2 or absent:
            raise ValueError(
                f"intersection {combo!r}: needs two or more known factors joined by "
                f"{INTERSECTION!r}; unknown: {absent or parts}"
            )
        joined = out[group_column(parts[0])]
        for p in parts[1:]:
            joined = joined + GROUP_JOIN + out[group_column(p)]
        out[group_column(combo)] = joined
    return out


def groups_of(preds: pd.DataFrame, factor: str) -> pd.Series:
    """The group labels for ``factor``; clear error when :func:`add_groups` has not made them."""
    col = group_column(factor)
    if col not in preds.columns:
        have = sorted(c[len(GROUP_PREFIX) :] for c in preds.columns if c.startswith(GROUP_PREFIX))
        raise ValueError(
            f"predictions: no groups for factor {factor!r} (column {col!r}); "
            f"available: {have}. Call add_groups() with this factor first."
        )
    return preds[col].astype(str)


def group_sort_key(label: str) -> tuple:
    """Order groups naturally: age bands by age (``<40`` before ``40-59`` before ``80+``),
    other labels alphabetically, ``unknown`` last; intersections part by part."""
    return tuple(_part_key(part) for part in str(label).split(GROUP_JOIN))


def _part_key(part: str) -> tuple:
    if part == UNKNOWN:
        return (2, 0.0, part)
    number = re.search(r"\d+(\.\d+)?", part)
    if number is None:
        return (1, 0.0, part)
    value = float(number.group())
    return (0, value - 0.5 if part.startswith("<") else value, part)


def is_unknown(label: str) -> bool:
    """True for a group made (wholly or partly) of missing metadata."""
    return UNKNOWN in label.split(GROUP_JOIN)
