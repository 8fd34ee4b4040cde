"""How alike two or more cohorts are: per-band counts and standardised mean differences (SMD).

SMD is the effect-size measure of covariate balance used for matched cohorts (|SMD| < 0.1 is the
usual "balanced" threshold), and, unlike a p-value, it does not shrink or grow with cohort size.

* Continuous variable (``age``): ``(m1 - m2) / sqrt((s1^2 + s2^2) / 2)``; missing values dropped.
* Categorical variable (``sex``, ``age_band``, ...; missing -> ``"unknown"``): per level, the SMD of
  the two proportions ``(p1 - p2) / sqrt((p1(1-p1) + p2(1-p2)) / 2)``, and one overall value, the
  multi-level Mahalanobis SMD of Yang & Dalton (2012): ``sqrt(d' S^-1 d)`` with ``d`` the
  difference in level proportions (one level dropped) and ``S`` the mean of the two multinomial
  covariance matrices (pseudo-inverse, so a level absent from both sites is harmless). For a
  two-level variable this equals the absolute per-level SMD.
* An SMD whose denominator is 0 is 0 when the two sides agree, else ``None`` (undefined).

Also usable to compare a cohort to its own pool: pass ``{"cohort": c, "pool": p}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from retfm.data.schema import age_band_labels, age_bands

AGE = "age"
AGE_BAND = "age_band"
UNKNOWN = "unknown"


def smd_continuous(a: np.ndarray, b: np.ndarray) -> float | None:
    """Standardised mean difference of two samples (pooled SD from both variances)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if len(a) < 2 or len(b) < 2:
        return None
    diff = float(a.mean() - b.mean())
    pooled = float(np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2.0))
    return _ratio(diff, pooled)


def smd_categorical(p: pd.Series, q: pd.Series) -> tuple[float | None, dict[str, float | None]]:
    """Overall (Mahalanobis) and per-level SMD of two proportion vectors over the same levels."""
    levels = sorted(set(p.index) | set(q.index), key=str)
    p1 = p.reindex(levels, fill_value=0.0).to_numpy(dtype=float)
    p2 = q.reindex(levels, fill_value=0.0).to_numpy(dtype=float)
    per_level = {
        str(level): _ratio(a - b, float(np.sqrt((a * (1 - a) + b * (1 - b)) / 2.0)))
        for level, a, b in zip(levels, p1, p2, strict=True)
    }
    if len(levels) < 2:
        return 0.0, per_level
    d = (p1 - p2)[1:]
    cov = (_multinomial_cov(p1[1:]) + _multinomial_cov(p2[1:])) / 2.0
    overall = float(np.sqrt(max(float(d @ np.linalg.pinv(cov) @ d), 0.0)))
    if not np.isfinite(overall):
        return None, per_level
    return overall, per_level


def balance_report(
    cohorts: Mapping[str, pd.DataFrame],
    variables: Iterable[str],
    age_edges: Iterable[float],
) -> dict[str, Any]:
    """Per-site counts and pairwise SMDs of ``variables`` between named cohorts (JSON-ready).

    ``age`` is continuous; ``age_band`` is derived from ``age`` and ``age_edges`` when a cohort
    lacks the column; every other variable is categorical. Each pair also gets ``joint``: the
    largest absolute difference in share over the joint strata of the categorical variables and
    their total-variation distance, which is what ``matched`` sampling equalises.
    """
    edges = [float(e) for e in age_edges]
    variables = list(dict.fromkeys(variables))
    prepared = {name: _prepare(frame, variables, edges, name) for name, frame in cohorts.items()}
    categorical = [v for v in variables if v != AGE]
    sites: dict[str, Any] = {}
    for name, frame in prepared.items():
        entry: dict[str, Any] = {"images": int(len(frame))}
        if "patient_id" in frame.columns:
            entry["patients"] = int(frame["patient_id"].nunique())
        if AGE in frame.columns:
            age = frame[AGE].to_numpy(dtype=float)
            entry["age_mean"] = _round(np.nanmean(age)) if np.isfinite(age).any() else None
            entry["age_sd"] = _round(np.nanstd(age, ddof=1)) if np.isfinite(age).sum() > 1 else None
            entry["age_band_counts"] = _counts(frame[AGE_BAND], age_band_labels(edges))
        for var in categorical:
            order = age_band_labels(edges) if var == AGE_BAND else None
            entry.setdefault("counts", {})[var] = _counts(frame[var], order)
        sites[name] = entry
    pairs = [
        _pair(a, b, prepared[a], prepared[b], variables, categorical)
        for a, b in combinations(prepared, 2)
    ]
    smds = [p["max_abs_smd"] for p in pairs if p["max_abs_smd"] is not None]
    return {
        "variables": variables,
        "age_edges": edges,
        "sites": sites,
        "pairs": pairs,
        "max_abs_smd": max(smds) if smds else None,
    }


def _prepare(
    frame: pd.DataFrame, variables: list[str], edges: list[float], name: str
) -> pd.DataFrame:
    needed = {v for v in variables if v != AGE_BAND} | ({AGE} if AGE_BAND in variables else set())
    missing = sorted(c for c in needed if c not in frame.columns)
    if missing:
        raise ValueError(f"balance: cohort {name!r} has no column(s) {missing}")
    out = pd.DataFrame(index=frame.index)
    if AGE in frame.columns:
        out[AGE] = frame[AGE].astype(float)
        out[AGE_BAND] = (
            frame[AGE_BAND].astype("string").fillna(UNKNOWN)
            if AGE_BAND in frame.columns
            else age_bands(out[AGE].to_numpy(), edges)
        )
    if "patient_id" in frame.columns:
        out["patient_id"] = frame["patient_id"]
    for var in variables:
        if var not in (AGE, AGE_BAND):
            out[var] = frame[var].astype("string").fillna(UNKNOWN)
    # Categorical dtype: counts and joint strata then group small integer codes, not strings.
    cats = [c for c in out.columns if c not in (AGE, "patient_id")]
    return out.astype(dict.fromkeys(cats, "category"))


def _pair(
    a: str,
    b: str,
    fa: pd.DataFrame,
    fb: pd.DataFrame,
    variables: list[str],
    categorical: list[str],
) -> dict[str, Any]:
    smd: dict[str, Any] = {}
    for var in variables:
        if var == AGE:
            smd[var] = {"smd": _round(smd_continuous(fa[AGE].to_numpy(), fb[AGE].to_numpy()))}
            continue
        overall, levels = smd_categorical(_shares(fa[var]), _shares(fb[var]))
        smd[var] = {"smd": _round(overall), "levels": {k: _round(v) for k, v in levels.items()}}
    values = [abs(v["smd"]) for v in smd.values() if v["smd"] is not None]
    pair: dict[str, Any] = {
        "a": a,
        "b": b,
        "smd": smd,
        "max_abs_smd": max(values) if values else None,
    }
    if categorical:
        sa, sb = _joint_shares(fa, categorical), _joint_shares(fb, categorical)
        sa, sb = sa.align(sb, fill_value=0.0)
        diff = (sa - sb).abs()
        pair["joint"] = {
            "strata": int(len(diff)),
            "max_abs_share_diff": _round(float(diff.max())),
            "total_variation": _round(float(diff.sum() / 2.0)),
        }
    return pair


def _joint_shares(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    if len(frame) == 0:
        return pd.Series(dtype=float)
    counts = frame.groupby(columns, sort=True, observed=True).size()
    counts.index = ["|".join(map(str, k if isinstance(k, tuple) else (k,))) for k in counts.index]
    return counts / counts.sum()


def _shares(values: pd.Series) -> pd.Series:
    return values.value_counts(normalize=True) if len(values) else pd.Series(dtype=float)


def _counts(values: pd.Series, order: list[str] | None = None) -> dict[str, int]:
    """Counts per level; levels in ``order`` always appear (0 when absent), in that order."""
    counts = values.value_counts()
    counts.index = counts.index.astype(str)
    order = order or []
    keys = [*order, *sorted(k for k in counts.index if k not in set(order))]
    return {str(k): int(counts.get(k, 0)) for k in keys}


def _multinomial_cov(p: np.ndarray) -> np.ndarray:
    return np.diag(p) - np.outer(p, p)


def _ratio(num: float, den: float) -> float | None:
    if den > 1e-12:
        return float(num / den)
    return 0.0 if abs(num) <= 1e-12 else None


def _round(value: float | None, digits: int = 6) -> float | None:
    if value is None or not np.isfinite(value):
        return None
    return round(float(value), digits)
