"""Which differences between two FMs are real: paired AUROC tests, seed t-tests, p adjustment.

* :func:`delong_test`: paired DeLong test of two binary AUROCs on the same images, with the
  fast mid-rank covariance of Sun & Xu (2014). It assumes independent images; when patients
  contribute several images use :func:`paired_bootstrap` with ``cluster``.
* :func:`paired_bootstrap`: paired cluster bootstrap of (macro) AUROC difference, for
  multi-class tasks and clustered data.
* :func:`seed_ttest`: two-sided t-test over seeds, as RETFound reports. Welch's (unequal
  variance) by default: seed *i* of one FM shares nothing meaningful with seed *i* of another
  (different encoders), so pairing by seed is offered but not assumed.
* :func:`adjust_pvalues`: Holm (family-wise) or Benjamini-Hochberg (false discovery rate,
  scipy's ``false_discovery_control``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import stats

from retfm.evaluation.bootstrap import auroc_replicates
from retfm.evaluation.metrics import check_arrays


def _midrank(x: np.ndarray) -> np.ndarray:
    """Mid-ranks (1-based, ties averaged) along the last axis: x (k, n) -> (k, n)."""
    return stats.rankdata(x, method="average", axis=-1)


def _delong_covariance(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs (k,) and their covariance (k, k) for k score rows (k, n) on one binary target."""
    pos, neg = scores[:, positive], scores[:, ~positive]
    m, n = pos.shape[1], neg.shape[1]
    tx, ty, tz = _midrank(pos), _midrank(neg), _midrank(np.concatenate([pos, neg], axis=1))
    aucs = tz[:, :m].sum(axis=1) / m / n - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n  # structural components of the positives (k, m)
    v10 = 1.0 - (tz[:, m:] - ty) / m  # and of the negatives (k, n)
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return aucs, cov


def delong_test(y_true: np.ndarray, p_a: np.ndarray, p_b: np.ndarray) -> dict[str, float]:
    """Paired DeLong test of AUROC(a) vs AUROC(b) on a binary target.

    ``p_a``/``p_b`` are positive-class scores (n,) or (n, 2) probabilities. Returns auc_a, auc_b,
    diff (a - b), se, z and the two-sided p. Identical scores give diff 0, se 0, p 1.
    """
    y = np.asarray(y_true)
    scores = []
    for name, p in (("p_a", p_a), ("p_b", p_b)):
        p = np.asarray(p, dtype=float)
        if p.ndim == 2:
            if p.shape[1] != 2:
                raise ValueError(
                    f"{name}: DeLong is binary; use paired_bootstrap for K={p.shape[1]}"
                )
            check_arrays(y, p)
            p = p[:, 1]
        if p.shape != y.shape or not np.isfinite(p).all():
            raise ValueError(f"{name}: expected {y.shape} finite scores, got shape {p.shape}")
        scores.append(p)
    classes = set(np.unique(y).tolist())
    if not classes <= {0, 1}:
        raise ValueError(f"y_true: DeLong needs binary labels 0/1, got classes {sorted(classes)}")
    positive = y == 1
    if positive.all() or not positive.any():
        nan = float("nan")
        return {"auc_a": nan, "auc_b": nan, "diff": nan, "se": nan, "z": nan, "p": nan}
    aucs, cov = _delong_covariance(np.vstack(scores), positive)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    z: float
    p_value: float
    if se <= 1e-12:
        z, p_value = (0.0, 1.0) if abs(diff) <= 1e-12 else (float(np.sign(diff) * np.inf), 0.0)
    else:
        z = diff / se
        p_value = float(2 * stats.norm.sf(abs(z)))
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "diff": diff,
        "se": se,
        "z": z,
        "p": p_value,
    }


def paired_bootstrap(
    y: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    cluster: np.ndarray | None = None,
    ci: float = 0.95,
) -> dict[str, float]:
    """Paired bootstrap of macro AUROC(a) - AUROC(b): both FMs scored on the same resampled
    patients (``cluster`` ids) or images (None).

    p is two-sided from the centred replicates: (1 + #{|d* - d| >= |d|}) / (1 + B).
    """
    (auc_a, auc_b), (rep_a, rep_b) = auroc_replicates(
        y, [probs_a, probs_b], n_boot=n_boot, seed=seed, clusters=cluster
    )
    diff = auc_a - auc_b
    d = rep_a - rep_b
    d = d[np.isfinite(d)]
    if not d.size or not np.isfinite(diff):
        nan = float("nan")
        return {"auc_a": auc_a, "auc_b": auc_b, "diff": diff, "se": nan, "lo": nan, "hi": nan,
                "p": nan, "n_boot_defined": int(d.size)}  # fmt: skip
    lo, hi = np.quantile(d, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    extreme = int(np.sum(np.abs(d - diff) >= abs(diff) - 1e-12))
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "diff": float(diff),
        "se": float(d.std(ddof=1)) if d.size > 1 else float("nan"),
        "lo": float(lo),
        "hi": float(hi),
        "p": (1 + extreme) / (1 + d.size) if abs(diff) > 1e-12 else 1.0,
        "n_boot_defined": int(d.size),
    }


def seed_ttest(
    values_a: np.ndarray | list[float],
    values_b: np.ndarray | list[float],
    *,
    paired: bool = False,
) -> dict[str, float | str]:
    """Two-sided t-test of a metric over seeds: Welch's by default, paired by seed on request.

    Returns mean_a, mean_b, diff (a - b), t, p, n_a, n_b, test. Zero variance on both sides
    gives p = 1 when the means agree and p = 0 when they differ (then ``t`` is +-inf); fewer than
    two seeds gives p = NaN.
    """
    a = np.asarray(values_a, dtype=float)
    b = np.asarray(values_b, dtype=float)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("seed_ttest: values must be finite (drop undefined runs first)")
    if paired and a.shape != b.shape:
        raise ValueError(f"seed_ttest(paired=True): need equal seeds, got {a.size} and {b.size}")
    out: dict[str, float | str] = {
        "mean_a": float(a.mean()) if a.size else float("nan"),
        "mean_b": float(b.mean()) if b.size else float("nan"),
        "n_a": float(a.size),
        "n_b": float(b.size),
        "test": "paired t" if paired else "welch t",
    }
    out["diff"] = float(out["mean_a"]) - float(out["mean_b"])  # type: ignore[arg-type]
    if a.size < 2 or b.size < 2:
        return {**out, "t": float("nan"), "p": float("nan")}
    spread = np.ptp(a - b) if paired else max(np.ptp(a), np.ptp(b))
    if spread <= 1e-12:
        same = abs(float(out["diff"])) <= 1e-12
        t = 0.0 if same else float(np.sign(float(out["diff"])) * np.inf)
        return {**out, "t": t, "p": 1.0 if same else 0.0}
    res = stats.ttest_rel(a, b) if paired else stats.ttest_ind(a, b, equal_var=False)
    return {**out, "t": float(res.statistic), "p": float(res.pvalue)}


def adjust_pvalues(
    p: np.ndarray | list[float], method: Literal["holm", "bh"] = "holm"
) -> np.ndarray:
    """Adjusted p-values (Holm or Benjamini-Hochberg); NaN entries stay NaN and are not counted."""
    if method not in ("holm", "bh"):
        raise ValueError(f"adjust_pvalues: method must be 'holm' or 'bh', got {method!r}")
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = _holm(p[ok]) if method == "holm" else stats.false_discovery_control(p[ok])
    return out


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment. Written out because statsmodels' ``multipletests`` runs a
    full ``gc.collect()`` on every Holm call (~0.3 s), which dominated the factor analysis."""
    order = np.argsort(p)
    steps = np.arange(len(p), 0, -1)
    adjusted = np.minimum(np.maximum.accumulate(p[order] * steps), 1.0)
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out
