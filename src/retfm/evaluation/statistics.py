"""Which differences between two FMs are real: paired AUROC tests, seed t-tests, p adjustment.

* :func:`seeded_paired_test`: **the study's deciding test** for "is FM a better than FM b on this
  task?". Both FMs are scored on the same test images by several adaptation seeds; the estimate
  is the difference of the seed-mean AUROCs, and its variance has two parts: the test set's
  sampling error, from each image's influence on the AUROCs summed within patients (DeLong's
  structural components, clustered as in Obuchowski 1997), plus the training seeds' spread
  (s_a^2/S_a + s_b^2/S_b). A t reference with Satterthwaite degrees of freedom covers the few
  seeds. Why not a t-test over seeds: every seed is scored on the same finite test set, so the
  test set's error (usually the larger part) is invisible to it; in simulation it calls
  equally good FMs different 13-39% of the time (``retfm calibrate``).
* :func:`auroc_influence`: macro one-vs-rest AUROC and each image's first-order influence on it,
  the building block of the test above (works for K classes, not only binary).
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

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from retfm.evaluation.bootstrap import auroc_replicates
from retfm.evaluation.metrics import check_arrays


def _midrank(x: np.ndarray) -> np.ndarray:
    """Mid-ranks (1-based, ties averaged) along the last axis: x (k, n) -> (k, n)."""
    return stats.rankdata(x, method="average", axis=-1)


def _structural_components(
    scores: np.ndarray, positive: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components for k score rows (k, n) on one binary target: for each
    positive, the share of negatives it outranks (k, m); for each negative, the share of
    positives that outrank it (k, n_neg); ties count half. Their means are the AUROCs."""
    pos, neg = scores[:, positive], scores[:, ~positive]
    m, n = pos.shape[1], neg.shape[1]
    ranks = _midrank(np.concatenate([pos, neg], axis=1))
    of_positives = (ranks[:, :m] - _midrank(pos)) / n
    of_negatives = 1.0 - (ranks[:, m:] - _midrank(neg)) / m
    return of_positives, of_negatives


def _delong_covariance(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs (k,) and their covariance (k, k) for k score rows (k, n) on one binary target."""
    of_pos, of_neg = _structural_components(scores, positive)
    m, n = of_pos.shape[1], of_neg.shape[1]
    cov = np.atleast_2d(np.cov(of_pos)) / m + np.atleast_2d(np.cov(of_neg)) / n
    return of_pos.mean(axis=1), cov


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


# --------------------------------------------------------------------------- deciding test


def _binary_influence(scores: np.ndarray, positive: np.ndarray) -> tuple[float, np.ndarray]:
    """AUROC of ``scores`` for ``positive`` and each image's influence phi (sum(phi) = 0).

    AUROC - theta ~= sum_i phi_i, with phi_i = (V10_i - AUC) / m for a positive (V10: share of
    negatives it outranks, ties half) and (V01_j - AUC) / n for a negative.
    """
    of_pos, of_neg = _structural_components(scores[None, :], positive)
    v10, v01 = of_pos[0], of_neg[0]
    m, n = len(v10), len(v01)
    auc = float(v10.mean())
    phi = np.empty(len(scores))
    phi[positive] = (v10 - auc) / m
    phi[~positive] = (v01 - auc) / n
    return auc, phi


def auroc_influence(y_true: np.ndarray, probs: np.ndarray) -> tuple[float, np.ndarray]:
    """Macro one-vs-rest AUROC (as :func:`retfm.evaluation.metrics.auroc`) and each image's
    influence on it, (n,). NaN and zeros when no class is both present and absent."""
    y, p = check_arrays(y_true, probs)
    if p.shape[1] == 2:
        parts = [(p[:, 1], y == 1)]
    else:
        parts = [(p[:, c], y == c) for c in range(p.shape[1])]
    parts = [(s, t) for s, t in parts if t.any() and not t.all()]
    if not parts:
        return float("nan"), np.zeros(len(y))
    results = [_binary_influence(s, t) for s, t in parts]
    auc = float(np.mean([a for a, _ in results]))
    phi = np.mean([f for _, f in results], axis=0)
    return auc, phi


def clustered_variance(phi: np.ndarray, clusters: np.ndarray | None) -> tuple[float, int]:
    """Variance of sum(phi) when ``clusters`` (patients) are the independent units, with the
    K / (K - 1) small-sample factor; returns (variance, K)."""
    if clusters is None:
        sums, k = phi, len(phi)
    else:
        codes, uniques = pd.factorize(pd.Series(np.asarray(clusters)))
        k = len(uniques)
        sums = np.bincount(codes, weights=phi, minlength=k)
    if k < 2:
        return float("nan"), k
    return float(k / (k - 1) * np.sum(sums**2)), k


@dataclass(frozen=True)
class PairedResult:
    """One FM-vs-FM comparison on one task by :func:`seeded_paired_test` (a - b)."""

    auroc_a: float
    auroc_b: float
    diff: float
    se: float
    lo: float  # confidence interval of diff at ``ci``
    hi: float
    df: float
    p: float
    var_test: float  # test-set (patient-clustered) part of Var(diff)
    var_seeds: float  # training-seed part
    n_seeds_a: int
    n_seeds_b: int
    n_images: int
    n_patients: int
    undetermined: str  # "" when the test could be made, else why not
    seed_aurocs_a: tuple[float, ...] = ()
    seed_aurocs_b: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _undetermined(reason: str, **known: Any) -> PairedResult:
    nan = float("nan")
    base: dict[str, Any] = {
        "auroc_a": nan, "auroc_b": nan, "diff": nan, "se": nan, "lo": nan, "hi": nan,
        "df": nan, "p": nan, "var_test": nan, "var_seeds": nan, "n_seeds_a": 0,
        "n_seeds_b": 0, "n_images": 0, "n_patients": 0,
    }  # fmt: skip
    return PairedResult(**{**base, **known, "undetermined": reason})


def seeded_paired_test(
    y_true: np.ndarray,
    probs_a: Sequence[np.ndarray],
    probs_b: Sequence[np.ndarray],
    clusters: np.ndarray | None = None,
    *,
    ci: float = 0.95,
) -> PairedResult:
    """Is the seed-mean AUROC of FM a different from FM b's on the same test images?

    ``probs_a`` / ``probs_b``: one (n, K) probability array per adaptation seed, rows aligned with
    ``y_true`` (n,); ``clusters``: patient id per image (None: images independent).

    diff = mean_s AUROC(a_s) - mean_s AUROC(b_s);
    Var(diff) = Var_test + s_a^2 / S_a + s_b^2 / S_b, where Var_test is the patient-clustered
    variance of the summed per-image influences (mean over seeds of a's minus b's) and s^2 the
    sample variance of the per-seed AUROCs. The seed part also contains the seeds' own test
    noise, already in Var_test, so the variance errs on the large side. Two-sided p from a t
    distribution with Welch-Satterthwaite df (patients - 1 for the test part, S - 1 per seed
    part).

    Undetermined (``undetermined`` says why, p is NaN): fewer than two seeds on a side (the
    training variation cannot be estimated), an AUROC that is undefined (one class), or zero
    total variance.
    """
    known: dict[str, Any] = {"n_seeds_a": len(probs_a), "n_seeds_b": len(probs_b)}
    y = np.asarray(y_true)
    known["n_images"] = len(y)
    if min(len(probs_a), len(probs_b)) < 2:
        return _undetermined(
            "fewer than two seeds: the training variation cannot be estimated", **known
        )
    fits_a = [auroc_influence(y, p) for p in probs_a]
    fits_b = [auroc_influence(y, p) for p in probs_b]
    aucs_a = np.array([a for a, _ in fits_a])
    aucs_b = np.array([a for a, _ in fits_b])
    known.update(seed_aurocs_a=tuple(aucs_a.tolist()), seed_aurocs_b=tuple(aucs_b.tolist()))
    if not (np.isfinite(aucs_a).all() and np.isfinite(aucs_b).all()):
        return _undetermined("AUROC undefined: the test set has a single class", **known)
    phi = np.mean([f for _, f in fits_a], axis=0) - np.mean([f for _, f in fits_b], axis=0)
    var_test, n_clusters = clustered_variance(phi, clusters)
    known["n_patients"] = n_clusters
    known.update(auroc_a=float(aucs_a.mean()), auroc_b=float(aucs_b.mean()))
    diff = float(aucs_a.mean() - aucs_b.mean())
    known["diff"] = diff
    if not np.isfinite(var_test):
        return _undetermined("fewer than two patients in the test set", **known)
    parts = [
        (var_test, n_clusters - 1),
        (float(aucs_a.var(ddof=1)) / len(aucs_a), len(aucs_a) - 1),
        (float(aucs_b.var(ddof=1)) / len(aucs_b), len(aucs_b) - 1),
    ]
    var = sum(v for v, _ in parts)
    if var <= 1e-14:
        return _undetermined(
            "zero variance: identical predictions on every image and seed", **known
        )
    df = var**2 / sum(v**2 / d for v, d in parts if v > 0)
    se = float(np.sqrt(var))
    half = float(stats.t.ppf(0.5 + ci / 2, df)) * se
    return PairedResult(
        **known,
        se=se,
        lo=diff - half,
        hi=diff + half,
        df=float(df),
        p=float(2 * stats.t.sf(abs(diff) / se, df)),
        var_test=var_test,
        var_seeds=parts[1][0] + parts[2][0],
        undetermined="",
    )


def detectable_difference(se: float, df: float, alpha: float, power: float = 0.8) -> float:
    """Smallest true AUROC difference this test finds with probability ``power`` at level
    ``alpha`` (two-sided): (t_{1-alpha/2} + t_{power}) x se."""
    if not (np.isfinite(se) and np.isfinite(df)) or se <= 0:
        return float("nan")
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * se)


# --------------------------------------------------------------------------- data-level test


@dataclass(frozen=True)
class ReplicateFit:
    """One pre-training run's (replicate's) adaptation seeds on one test set: its seed-mean
    AUROC, the per-seed AUROCs and its per-patient summed influence (patients in a fixed order)."""

    auroc: float
    seed_aurocs: tuple[float, ...]
    patient_influence: np.ndarray


def replicate_fit(
    y_true: np.ndarray, probs: Sequence[np.ndarray], codes: np.ndarray, n_patients: int
) -> ReplicateFit:
    """:class:`ReplicateFit` of one replicate: ``probs`` one (n, K) array per seed, ``codes``
    the patient index (0..n_patients-1) of each image."""
    fits = [auroc_influence(y_true, p) for p in probs]
    aucs = tuple(float(a) for a, _ in fits)
    phi = np.mean([f for _, f in fits], axis=0)
    sums = np.bincount(codes, weights=phi, minlength=n_patients)
    return ReplicateFit(float(np.mean(aucs)), aucs, sums)


@dataclass(frozen=True)
class PooledResult:
    """One data-level comparison (site a's FMs vs site b's, one recipe, one task) by
    :func:`pooled_replicate_test` (a - b)."""

    auroc_a: float  # mean over replicates of the seed-mean AUROC
    auroc_b: float
    diff: float
    se: float
    lo: float
    hi: float
    df: float
    p: float
    var_replicates: float  # s_a^2 / K_a + s_b^2 / K_b: between pre-training runs
    var_test: float  # the test-set error common to a site's replicates
    sd_replicates_a: float  # sd of the replicates' AUROCs (draw + pre-training + the rest)
    sd_replicates_b: float
    n_replicates_a: int
    n_replicates_b: int
    n_images: int
    n_patients: int
    undetermined: str
    replicate_aurocs_a: tuple[float, ...] = ()
    replicate_aurocs_b: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ONE_RUN = "one pre-training run per site"


def _common_covariance(w: np.ndarray, n: int) -> float:
    """Mean over distinct replicate pairs (i != j) of the patient-clustered covariance of their
    AUROC errors, from per-patient influences w (K, P)."""
    k = len(w)
    total = w.sum(axis=0)
    return float(n / (n - 1) * np.sum(total**2 - (w**2).sum(axis=0)) / (k * (k - 1)))


def pooled_replicate_test(
    fits_a: Sequence[ReplicateFit],
    fits_b: Sequence[ReplicateFit],
    *,
    n_images: int = 0,
    ci: float = 0.95,
) -> PooledResult:
    """Is site a's pre-training data better than site b's for this task? Each site's FM was
    pre-trained K times (its own cohort draw and pre-training randomness each time), every
    replicate adapted with several seeds and scored on the same test images.

    diff = mean_i a_i - mean_j b_j, a_i the seed-mean AUROC of replicate i. With
    a_i = mu_a + delta_i + e_i (delta: the draw, iid; e: test-set error, correlated between all
    replicates because they share the test images),

        Var(diff) = s_a^2 / K_a + s_b^2 / K_b + (c_aa + c_bb - 2 c_ab),

    exactly: the replicates' sample variance s^2 estimates Var(delta + e) - c, and the c terms
    (the test-set covariance of two distinct replicates: c_aa within site a, c_ab across) add
    back the error they share, estimated from per-patient influences (patient-clustered, no
    replicate paired with itself, so nothing is counted twice); their sum is truncated at 0. The
    seeds' spread is inside s^2. t reference with Satterthwaite df: K - 1 per replicate part,
    patients - 1 for the test part. With fewer than two replicates per site the between-draw
    variance cannot be estimated: undetermined (``ONE_RUN``), never "no evidence".
    """
    ka, kb = len(fits_a), len(fits_b)
    nan = float("nan")
    a = np.array([f.auroc for f in fits_a])
    b = np.array([f.auroc for f in fits_b])
    n_pat = len(fits_a[0].patient_influence) if ka else 0
    base: dict[str, Any] = {
        "n_replicates_a": ka, "n_replicates_b": kb, "n_images": n_images, "n_patients": n_pat,
        "replicate_aurocs_a": tuple(a.tolist()), "replicate_aurocs_b": tuple(b.tolist()),
        "auroc_a": float(a.mean()) if ka else nan, "auroc_b": float(b.mean()) if kb else nan,
    }  # fmt: skip
    base["diff"] = base["auroc_a"] - base["auroc_b"]
    empty = {k: nan for k in ("se", "lo", "hi", "df", "p", "var_replicates", "var_test")}
    empty |= {"sd_replicates_a": nan, "sd_replicates_b": nan}

    def undetermined_(reason: str) -> PooledResult:
        return PooledResult(**{**empty, **base, "undetermined": reason})

    if ka < 2 or kb < 2:
        return undetermined_(
            ONE_RUN
            if max(ka, kb) < 2
            else "fewer than two pre-training runs of a site's FM: the between-draw variance "
            "cannot be estimated"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return undetermined_("AUROC undefined: the test set has a single class")
    if n_pat < 2:
        return undetermined_("fewer than two patients in the test set")
    wa = np.stack([f.patient_influence for f in fits_a])
    wb = np.stack([f.patient_influence for f in fits_b])
    c_aa, c_bb = _common_covariance(wa, n_pat), _common_covariance(wb, n_pat)
    c_ab = float(n_pat / (n_pat - 1) * np.sum(wa.mean(axis=0) * wb.mean(axis=0)))
    var_test = max(c_aa + c_bb - 2 * c_ab, 0.0)
    sa2, sb2 = float(a.var(ddof=1)), float(b.var(ddof=1))
    parts = [(sa2 / ka, ka - 1), (sb2 / kb, kb - 1), (var_test, n_pat - 1)]
    var = sum(v for v, _ in parts)
    if var <= 1e-14:
        return undetermined_("zero variance: identical predictions on every image and run")
    df = var**2 / sum(v**2 / d for v, d in parts if v > 0)
    se = float(np.sqrt(var))
    half = float(stats.t.ppf(0.5 + ci / 2, df)) * se
    return PooledResult(
        **base,
        se=se,
        lo=base["diff"] - half,
        hi=base["diff"] + half,
        df=float(df),
        p=float(2 * stats.t.sf(abs(base["diff"]) / se, df)),
        var_replicates=parts[0][0] + parts[1][0],
        var_test=var_test,
        sd_replicates_a=float(np.sqrt(sa2)),
        sd_replicates_b=float(np.sqrt(sb2)),
        undetermined="",
    )


def replicates_power(
    sd_a: float,
    sd_b: float,
    var_test: float,
    n_patients: int,
    alpha: float,
    power: float = 0.8,
    replicates: Sequence[int] = (1, 2, 3, 5),
) -> dict[int, float]:
    """The AUROC advantage :func:`pooled_replicate_test` finds with probability ``power`` at
    level ``alpha`` with K replicates per site, given the replicates' AUROC sd per site and the
    common test-set variance measured in a study (NaN for K = 1: undetermined by design)."""
    out = {}
    for k in replicates:
        if k < 2:
            out[k] = float("nan")
            continue
        parts = [(sd_a**2 / k, k - 1), (sd_b**2 / k, k - 1), (var_test, max(n_patients - 1, 1))]
        var = sum(v for v, _ in parts)
        if not np.isfinite(var) or var <= 0:
            out[k] = float("nan")
            continue
        df = var**2 / sum(v**2 / d for v, d in parts if v > 0)
        out[k] = detectable_difference(float(np.sqrt(var)), df, alpha, power)
    return out


def replicates_needed(
    advantage: float,
    sd_a: float,
    sd_b: float,
    var_test: float,
    n_patients: int,
    alpha: float,
    power: float = 0.8,
    most: int = 100,
) -> int | None:
    """The fewest replicates per site at which ``advantage`` is found with ``power`` (None:
    not within ``most``, e.g. when the common test-set error alone is too large)."""
    for k in range(2, most + 1):
        d = replicates_power(sd_a, sd_b, var_test, n_patients, alpha, power, (k,))[k]
        if np.isfinite(d) and d <= advantage:
            return k
    return None
