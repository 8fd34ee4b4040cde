"""Overall classification metrics from class probabilities, RETFound's set plus calibration.

Every function takes ``y_true`` (n,) integer class indices in ``0..K-1`` and ``probs`` (n, K)
class probabilities (rows sum to 1), K >= 2. Binary tasks (K == 2) score the class-1 column;
multi-class tasks are scored one-vs-rest and macro-averaged over the classes that are both present
and absent somewhere in ``y_true`` (an absent class has no AUROC, so averaging it as 0 or 0.5 would
invent a number). A metric that cannot be defined, such as AUROC on a single class, is NaN: never
0, which would read as "worst possible" rather than "unknown".

Subgroup analyses reduce a multi-class task to "any disease" (label > 0) versus "no disease"
(label 0) for the rates that need one positive class (n_pos, TPR, FPR, selection rate); see
:func:`positive_labels` and :func:`positive_scores`.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, cohen_kappa_score, f1_score, roc_auc_score

ECE_BINS = 15


def check_arrays(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert the metric inputs; the error names the first offending row."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs: expected shape (n, K) with K >= 2, got {p.shape}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true: expected shape ({p.shape[0]},), got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y.astype(float))) or np.any(y != np.round(y)):
            bad = int(np.flatnonzero(~np.isfinite(y.astype(float)) | (y != np.round(y)))[0])
            raise ValueError(f"y_true: row {bad}: expected an integer class index, got {y[bad]!r}")
        y = y.astype(int)
    k = p.shape[1]
    out_of_range = (y < 0) | (y >= k)
    if out_of_range.any():
        bad = int(np.flatnonzero(out_of_range)[0])
        raise ValueError(f"y_true: row {bad}: class index {y[bad]} is outside 0..{k - 1}")
    bad_rows = ~np.isfinite(p).all(axis=1) | (p < 0).any(axis=1) | (p > 1).any(axis=1)
    bad_rows |= np.abs(p.sum(axis=1) - 1.0) > 1e-3
    if bad_rows.any():
        bad = int(np.flatnonzero(bad_rows)[0])
        raise ValueError(
            f"probs: row {bad}: expected finite probabilities in [0, 1] summing to 1, "
            f"got {p[bad].tolist()}"
        )
    return y.astype(int), p


def positive_labels(y_true: np.ndarray, n_classes: int) -> np.ndarray:
    """Binary target for rate metrics: class 1 (binary) or any disease, label > 0 (multi-class)."""
    y = np.asarray(y_true)
    return y > 0 if n_classes > 2 else y == 1


def positive_scores(probs: np.ndarray) -> np.ndarray:
    """Score of the positive event in :func:`positive_labels`: P(class 1) or 1 - P(class 0)."""
    return probs[:, 1] if probs.shape[1] == 2 else 1.0 - probs[:, 0]


def predicted_positive(probs: np.ndarray) -> np.ndarray:
    """Hard positive call: the arg-max class is 1 (binary) or any disease class (multi-class)."""
    top = probs.argmax(axis=1)
    return (top == 1) if probs.shape[1] == 2 else (top > 0)


def auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """AUROC; binary on P(class 1), multi-class one-vs-rest macro over defined classes."""
    return _one_vs_rest(y_true, probs, roc_auc_score)


def aupr(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Average precision, the same way as :func:`auroc`."""
    return _one_vs_rest(y_true, probs, average_precision_score)


def _one_vs_rest(y_true: np.ndarray, probs: np.ndarray, score) -> float:
    if len(np.unique(y_true)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(score(y_true == 1, probs[:, 1]))
    values = []
    for c in range(probs.shape[1]):
        target = y_true == c
        if target.any() and not target.all():
            values.append(score(target, probs[:, c]))
    return float(np.mean(values))


def accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == y_true)) if len(y_true) else float("nan")


def kappa(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Cohen's kappa; NaN when chance agreement is 1 (every label and call the same class)."""
    pred = probs.argmax(axis=1)
    if len(y_true) == 0 or (len(np.unique(y_true)) == 1 and np.all(pred == y_true[0])):
        return float("nan")
    return float(cohen_kappa_score(y_true, pred))


def f1_macro(y_true: np.ndarray, probs: np.ndarray) -> float:
    if len(y_true) == 0:
        return float("nan")
    return float(f1_score(y_true, probs.argmax(axis=1), average="macro", zero_division=0))


def ece(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error with equal-width confidence bins.

    ECE = sum_b (n_b / n) |accuracy_b - mean confidence_b|; bins are (i/B, (i+1)/B].
    """
    if len(y_true) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    n = np.bincount(bins, minlength=n_bins)
    gap = np.abs(
        np.bincount(bins, weights=correct, minlength=n_bins)
        - np.bincount(bins, weights=conf, minlength=n_bins)
    )
    return float(gap.sum() / n.sum())


METRICS = {
    "auroc": auroc,
    "aupr": aupr,
    "accuracy": accuracy,
    "f1_macro": f1_macro,
    "kappa": kappa,
    "ece": ece,
}


def overall_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The study's headline metrics on one prediction set: auroc, aupr, accuracy, f1_macro,
    kappa, ece (NaN where undefined)."""
    y, p = check_arrays(y_true, probs)
    return {name: fn(y, p) for name, fn in METRICS.items()}
