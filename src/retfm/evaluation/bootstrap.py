"""Fast cluster-bootstrap intervals for AUROC and accuracy, overall and per subgroup.

Why not loop: fairlearn's ``MetricFrame(n_boot=...)`` re-samples the rows and recomputes every
metric per replicate (a pandas sample, a group-by and one ``roc_auc_score`` per group each
time). Here each replicate is a vector of cluster *weights* (how often each patient was drawn),
so all replicates of a chunk are scored at once:

* weights: ``W`` (b, C) multinomial counts, drawn as C uniform cluster indices per replicate and
  counted with one ``bincount``;
* AUROC: the negatives are sorted by score once; for a positive i the weight of negatives below
  it (ties counted half) is ``(cum[lo_i] + cum[hi_i]) / 2`` with ``cum`` (b, n_neg + 1) the
  running sum of the replicate's negative weights and ``lo_i``/``hi_i`` its ``searchsorted``
  bounds. AUROC_b = sum_i w_bi (cum_b[lo_i] + cum_b[hi_i]) / 2 / (W_pos,b W_neg,b): O(b n) work,
  no sort per replicate;
* accuracy: ``W @ correct_per_cluster / W @ images_per_cluster``.

Patients, not images, are resampled (``cluster="patient_id"``): images of one patient are
correlated, and resampling images would make intervals too narrow. A replicate in which a group
lacks a class has no AUROC; the interval uses the replicates where it is defined and reports how
many (``n_boot_defined``). Intervals are percentile intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from retfm.evaluation.metrics import check_arrays
from retfm.evaluation.subgroups import arrays, group_sort_key, groups_of

ELEMENTS_PER_CHUNK = 4_000_000  # replicates x images held at once (~32 MB per float64 array)


def cluster_index(clusters: np.ndarray | pd.Series | None, n: int) -> tuple[np.ndarray, int]:
    """Map cluster ids to ``0..C-1`` (each row its own cluster when ``clusters`` is None)."""
    if clusters is None:
        return np.arange(n), n
    codes, uniques = pd.factorize(pd.Series(np.asarray(clusters)), use_na_sentinel=True)
    if (codes < 0).any():
        raise ValueError(f"cluster ids: row {int(np.flatnonzero(codes < 0)[0])} is missing")
    return codes.astype(np.int64), len(uniques)


def draw_weights(rng: np.random.Generator, n_clusters: int, n_rep: int) -> np.ndarray:
    """(n_rep, n_clusters) bootstrap counts: each replicate draws n_clusters clusters."""
    draws = rng.integers(0, n_clusters, size=(n_rep, n_clusters))
    draws += np.arange(n_rep)[:, None] * n_clusters
    counts = np.bincount(draws.ravel(), minlength=n_rep * n_clusters)
    return counts.reshape(n_rep, n_clusters).astype(np.float64)


class BinaryAuroc:
    """Weighted AUROC of one binary problem for many weight vectors at once."""

    def __init__(self, scores: np.ndarray, positive: np.ndarray, cluster: np.ndarray) -> None:
        positive = positive.astype(bool)
        neg_scores = scores[~positive]
        order = np.argsort(neg_scores, kind="stable")
        sorted_neg = neg_scores[order]
        self.neg_cluster = cluster[~positive][order]
        self.pos_cluster = cluster[positive]
        pos_scores = scores[positive]
        self.lo = np.searchsorted(sorted_neg, pos_scores, side="left")
        self.hi = np.searchsorted(sorted_neg, pos_scores, side="right")

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        """weights (b, C) -> AUROC (b,), NaN where a replicate has no positive or no negative."""
        b = weights.shape[0]
        cum = np.zeros((b, len(self.neg_cluster) + 1))
        np.cumsum(weights[:, self.neg_cluster], axis=1, out=cum[:, 1:])
        wpos = weights[:, self.pos_cluster]
        below = cum[:, self.lo]
        below += cum[:, self.hi]
        num = 0.5 * np.einsum("ij,ij->i", wpos, below)
        den = wpos.sum(axis=1) * cum[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


class MacroAuroc:
    """One-vs-rest macro AUROC (binary: class-1 AUROC) over the classes defined per replicate,
    matching :func:`retfm.evaluation.metrics.auroc`."""

    def __init__(self, y: np.ndarray, probs: np.ndarray, cluster: np.ndarray) -> None:
        if probs.shape[1] == 2:
            self.parts = [BinaryAuroc(probs[:, 1], y == 1, cluster)]
        else:
            self.parts = [
                BinaryAuroc(probs[:, c], y == c, cluster)
                for c in range(probs.shape[1])
                if (y == c).any() and not (y == c).all()
            ]

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        if not self.parts:
            return np.full(weights.shape[0], np.nan)
        per_class = np.stack([part(weights) for part in self.parts])
        defined = np.isfinite(per_class)
        # Macro AUROC needs two classes present, which makes every present class defined.
        with np.errstate(invalid="ignore"):
            mean = np.nansum(per_class, axis=0) / defined.sum(axis=0)
        return np.where(defined.any(axis=0), mean, np.nan)


class WeightedRatio:
    """sum(w * numerator) / sum(w * denominator) per cluster column, for many groups at once."""

    def __init__(self, numerators: np.ndarray, denominators: np.ndarray) -> None:
        self.num = numerators  # (C, G)
        self.den = denominators  # (C, G)

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        num, den = weights @ self.num, weights @ self.den
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def replicate(
    statistics: Sequence[Callable[[np.ndarray], np.ndarray]],
    n_clusters: int,
    n_boot: int,
    seed: int,
    n_rows: int,
) -> list[np.ndarray]:
    """Evaluate each statistic on the same ``n_boot`` cluster-weight replicates, chunk by chunk.

    Each statistic maps weights (b, C) to (b,) or (b, G); results are stacked to (n_boot, ...).
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, ELEMENTS_PER_CHUNK // max(n_rows, n_clusters, 1)))
    parts: list[list[np.ndarray]] = [[] for _ in statistics]
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        weights = draw_weights(rng, n_clusters, b)
        for out, stat in zip(parts, statistics, strict=True):
            out.append(stat(weights))
        done += b
    return [np.concatenate(p, axis=0) for p in parts]


def _interval(estimate: float, reps: np.ndarray, ci: float) -> tuple[float, float, int]:
    ok = reps[np.isfinite(reps)]
    if not ok.size or not np.isfinite(estimate):
        return float("nan"), float("nan"), int(ok.size)
    lo, hi = np.quantile(ok, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(lo), float(hi), int(ok.size)


def bootstrap_intervals(
    preds: pd.DataFrame,
    factors: list[str],
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    cluster: str | None = "patient_id",
) -> pd.DataFrame:
    """Percentile intervals of AUROC and accuracy, overall and per group of each factor.

    ``factors`` name groupings made by :func:`~retfm.evaluation.subgroups.add_groups`;
    ``cluster=None`` resamples images. Rows: factor ("overall" | name), group ("all" | label),
    metric, estimate, lo, hi, n_boot_defined, n (images).
    """
    if n_boot < 1 or not 0 < ci < 1:
        raise ValueError(f"bootstrap: need n_boot >= 1 and 0 < ci < 1, got {n_boot}, {ci}")
    y, probs = arrays(preds)
    cl, n_clusters = cluster_index(None if cluster is None else preds[cluster], len(y))
    masks = [("overall", "all", np.ones(len(y), bool))]
    for factor in factors:
        labels = groups_of(preds, factor).to_numpy()
        masks += [(factor, g, labels == g) for g in sorted(set(labels), key=group_sort_key)]
    stats: list[Callable[[np.ndarray], np.ndarray]] = [
        MacroAuroc(y[mk], probs[mk], cl[mk]) for _, _, mk in masks
    ]
    correct = probs.argmax(axis=1) == y
    counts = np.stack([np.bincount(cl[mk], minlength=n_clusters) for _, _, mk in masks], 1)
    hits = np.stack([np.bincount(cl[mk & correct], minlength=n_clusters) for _, _, mk in masks], 1)
    stats.append(WeightedRatio(hits.astype(float), counts.astype(float)))
    ones = np.ones((1, n_clusters))
    estimates = [s(ones)[0] for s in stats]
    reps = replicate(stats, n_clusters, n_boot, seed, len(y))
    rows = []
    for i, (factor, group, mk) in enumerate(masks):
        for metric, est, rep in (
            ("auroc", estimates[i], reps[i]),
            ("accuracy", estimates[-1][i], reps[-1][:, i]),
        ):
            lo, hi, n_def = _interval(float(est), rep, ci)
            rows.append((factor, group, metric, float(est), lo, hi, n_def, int(mk.sum())))
    columns = ["factor", "group", "metric", "estimate", "lo", "hi", "n_boot_defined", "n"]
    return pd.DataFrame(rows, columns=columns)


def auroc_replicates(
    y_true: np.ndarray,
    probs_list: Sequence[np.ndarray],
    *,
    n_boot: int,
    seed: int,
    clusters: np.ndarray | None = None,
) -> tuple[list[float], list[np.ndarray]]:
    """Macro AUROC of several prediction sets on the *same* resampled patients (paired).

    Returns the point estimates and, per set, the (n_boot,) replicate values.
    """
    checked = [check_arrays(y_true, p) for p in probs_list]
    y = checked[0][0]
    cl, n_clusters = cluster_index(clusters, len(y))
    stats = [MacroAuroc(y, p, cl) for _, p in checked]
    ones = np.ones((1, n_clusters))
    return [float(s(ones)[0]) for s in stats], replicate(stats, n_clusters, n_boot, seed, len(y))
