"""Per-subgroup metrics (with fairlearn's MetricFrame), fairness gaps and MLflow metric keys.

What the field reports (STUDY.md "How fairness is measured"): per group of a factor its size and
positive/negative counts, AUROC, accuracy, TPR, FPR, ECE and selection rate; over the groups the
AUROC gap (max - min), the worst-group AUROC, the equalised-odds difference (largest TPR or FPR
gap), the demographic-parity difference (selection-rate gap) and the equity-scaled AUROC
``ES-AUC = AUC / (1 + sum_g |AUC - AUC_g|)``.

"Positive" for a multi-class task is *any disease* (label > 0) versus label 0; AUROC stays the
task's one-vs-rest macro AUROC, so a group's AUROC is comparable with the overall one.

A group is *undefined* when it holds a single class (no AUROC; fairlearn would report NaN AUROC
and a TPR of 0) or fewer images than ``min_group_size``. Undefined groups stay in the table with
``defined=False`` and a ``reason``, never a 0; gaps are taken over defined groups only and a
summary over a factor with undefined groups says ``complete: False`` and names them. The group
``unknown`` (missing metadata) is reported but kept out of every gap.

MLflow metric keys
------------------
DESIGN.md names per-group metrics ``<metric>/<factor>=<group>`` (``auroc/age=60-79``), but MLflow
keys may hold only letters, digits, ``_ - . /``, space (and ``:`` except on Windows), so ``=``,
``<``, ``>``, ``+`` and ``*`` are rejected. The faithful, portable encoding used here replaces the
``=`` by one more path level and spells the comparison signs::

    auroc/age=<60          -> auroc/age/lt60          (<  -> lt, <= -> le)
    auroc/age=>=60         -> auroc/age/ge60          (>= -> ge, >  -> gt)
    auroc/age_fine=80+     -> auroc/age_fine/80plus   (+  -> plus)
    auroc/age_fine=40-59   -> auroc/age_fine/40-59
    n/sex=F                -> n/sex/F
    auroc/age*sex=<60 & F  -> auroc/age_x_sex/lt60_x_F (*, " & " -> _x_)
    gap/auroc/age, worst/auroc/age, eod/age, dpd/age, es_auc/age, n_undefined/age

Any other disallowed character becomes ``_``; two labels of one factor that would collide raise.
:func:`metric_keys` returns the mapping from every key back to its human name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame

from retfm.evaluation import metrics as m
from retfm.evaluation.subgroups import arrays, group_sort_key, groups_of, is_unknown

SINGLE_CLASS = "single class"
TOO_SMALL = "n < min_group_size"
GROUP_METRICS = ("auroc", "accuracy", "tpr", "fpr", "ece", "selection_rate")
COUNTS = ("n", "n_pos", "n_neg")


def _n(y: np.ndarray, p: np.ndarray) -> float:
    return float(len(y))


def _n_pos(y: np.ndarray, p: np.ndarray) -> float:
    return float(m.positive_labels(y, p.shape[1]).sum())


def _n_neg(y: np.ndarray, p: np.ndarray) -> float:
    return float(len(y) - m.positive_labels(y, p.shape[1]).sum())


def _rate(y: np.ndarray, p: np.ndarray, among_positives: bool) -> float:
    """TPR / FPR of the hard positive call; NaN (not fairlearn's 0) when the class is absent."""
    pos = m.positive_labels(y, p.shape[1]).astype(bool)
    among = pos if among_positives else ~pos
    return float(m.predicted_positive(p)[among].mean()) if among.any() else float("nan")


def _tpr(y: np.ndarray, p: np.ndarray) -> float:
    return _rate(y, p, True)


def _fpr(y: np.ndarray, p: np.ndarray) -> float:
    return _rate(y, p, False)


def _selection_rate(y: np.ndarray, p: np.ndarray) -> float:
    return float(m.predicted_positive(p).mean()) if len(y) else float("nan")


_FRAME_METRICS = {
    "n": _n,
    "n_pos": _n_pos,
    "n_neg": _n_neg,
    "auroc": m.auroc,
    "accuracy": m.accuracy,
    "tpr": _tpr,
    "fpr": _fpr,
    "ece": m.ece,
    "selection_rate": _selection_rate,
}


def subgroup_table(preds: pd.DataFrame, factor: str, *, min_group_size: int) -> pd.DataFrame:
    """One row per group of ``factor`` (groups from :func:`~retfm.evaluation.subgroups.add_groups`).

    Columns: factor, group, n, n_pos, n_neg, auroc, accuracy, tpr, fpr, ece, selection_rate,
    defined, reason ("" | "single class" | "n < min_group_size"), large_enough, missing_metadata.
    """
    y, probs = arrays(preds)
    groups = groups_of(preds, factor)
    frame = MetricFrame(
        metrics=_FRAME_METRICS,
        y_true=y,
        y_pred=probs,
        sensitive_features=pd.Series(groups.to_numpy(), name="group"),
    )
    table = frame.by_group.reset_index()
    table.insert(0, "factor", factor)
    for col in COUNTS:
        table[col] = table[col].astype(int)
    n_classes = np.array(
        [len(np.unique(y[groups.to_numpy() == g])) for g in table["group"]], dtype=int
    )
    single = n_classes < 2
    table["large_enough"] = table["n"] >= min_group_size
    table["defined"] = ~single & table["large_enough"]
    table["reason"] = np.where(single, SINGLE_CLASS, np.where(table["large_enough"], "", TOO_SMALL))
    table.loc[single, "auroc"] = np.nan
    table["missing_metadata"] = [is_unknown(g) for g in table["group"]]
    order = sorted(range(len(table)), key=lambda i: group_sort_key(table["group"].iloc[i]))
    return table.iloc[order].reset_index(drop=True)


def _spread(values: pd.Series) -> float:
    v = values.dropna()
    return float(v.max() - v.min()) if len(v) >= 2 else float("nan")


def fairness_summary(table: pd.DataFrame, overall_auroc: float) -> dict[str, Any]:
    """Gaps over one factor's groups (a :func:`subgroup_table`).

    AUROC-based figures (gap, worst, ES-AUC) use defined groups; TPR/FPR/selection-rate gaps use
    every group with at least ``min_group_size`` images whose rate exists. ``complete`` is False
    when any group (other than ``unknown``) is undefined: the gap then leaves those groups out.
    """
    factors = table["factor"].unique()
    if len(factors) != 1:
        raise ValueError(f"fairness_summary: expected one factor's table, got {list(factors)}")
    known = table[~table["missing_metadata"]]
    defined = known[known["defined"]]
    sized = known[known["large_enough"]]
    undefined = known.loc[~known["defined"], "group"].tolist()
    auc = defined["auroc"]
    worst_idx = auc.idxmin() if len(auc) else None
    eod_parts = [_spread(sized["tpr"]), _spread(sized["fpr"])]
    return {
        "factor": str(factors[0]),
        "n_groups": int(len(known)),
        "n_defined": int(len(defined)),
        "n_undefined": int(len(undefined)),
        "undefined": undefined,
        "excluded": table.loc[table["missing_metadata"], "group"].tolist(),
        "complete": not undefined,
        "gap": _spread(auc),
        "worst": float(auc.min()) if len(auc) else float("nan"),
        "worst_group": None if worst_idx is None else str(defined.loc[worst_idx, "group"]),
        "eod": float(np.nanmax(eod_parts)) if not np.all(np.isnan(eod_parts)) else float("nan"),
        "dpd": _spread(sized["selection_rate"]),
        "es_auc": (
            float(overall_auroc / (1.0 + np.abs(overall_auroc - auc).sum()))
            if len(auc) and np.isfinite(overall_auroc)
            else float("nan")
        ),
    }


# ---- MLflow metric keys -------------------------------------------------------------------

_SIGNS: tuple[tuple[str, str], ...] = (
    (" & ", "_x_"),
    ("*", "_x_"),
    (">=", "ge"),
    ("<=", "le"),
    ("<", "lt"),
    (">", "gt"),
)
_SIGNS += (("+", "plus"), ("=", "eq"))
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def slug(label: str) -> str:
    """MLflow-safe spelling of a factor or group label (see the module docstring)."""
    s = str(label).strip()
    for old, new in _SIGNS:
        s = s.replace(old, new)
    s = _UNSAFE.sub("_", s)
    return s if s and not s.startswith(".") else f"g{s}"


@dataclass(frozen=True)
class MetricKeys:
    """What to log: ``metrics`` (all finite), ``undefined`` (keys left out because the value is
    undefined), ``labels`` (every key -> its human DESIGN.md name, e.g. ``auroc/age=<60``)."""

    metrics: dict[str, float] = field(default_factory=dict)
    undefined: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)


def _put(out: MetricKeys, key: str, label: str, value: float | None, defined: bool = True) -> None:
    if key in out.labels and out.labels[key] != label:
        raise ValueError(
            f"metric key {key!r} would stand for both {out.labels[key]!r} and {label!r}"
        )
    out.labels[key] = label
    if defined and value is not None and np.isfinite(value):
        out.metrics[key] = float(value)
    else:
        out.undefined.append(key)


def metric_keys(
    overall: Mapping[str, float],
    tables: Iterable[pd.DataFrame],
    summaries: Iterable[Mapping[str, Any]],
) -> MetricKeys:
    """Flatten overall metrics, subgroup tables and fairness summaries into MLflow keys.

    Counts are always logged; an undefined group's other metrics, and any NaN, are listed in
    ``undefined`` instead (MLflow cannot store NaN meaningfully). The tables themselves, with
    their undefined rows, are what to log with ``mlflow.log_table``.
    """
    out = MetricKeys()
    for name, value in overall.items():
        _put(out, slug(name), name, value)
    for table in tables:
        for row in table.itertuples(index=False):
            f, g = slug(row.factor), slug(row.group)
            for col in COUNTS:
                _put(out, f"{col}/{f}/{g}", f"{col}/{row.factor}={row.group}", getattr(row, col))
            for col in GROUP_METRICS:
                key, label = f"{col}/{f}/{g}", f"{col}/{row.factor}={row.group}"
                _put(out, key, label, getattr(row, col), defined=bool(row.defined))
    for s in summaries:
        f, name = slug(s["factor"]), s["factor"]
        _put(out, f"gap/auroc/{f}", f"gap/auroc/{name}", s["gap"])
        _put(out, f"worst/auroc/{f}", f"worst/auroc/{name}", s["worst"])
        for stat in ("eod", "dpd", "es_auc", "n_undefined"):
            _put(out, f"{stat}/{f}", f"{stat}/{name}", s[stat])
    return out
