import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from statsmodels.stats.multitest import multipletests

from retfm.evaluation.metrics import auroc
from retfm.evaluation.statistics import (
    adjust_pvalues,
    auroc_influence,
    clustered_variance,
    delong_test,
    detectable_difference,
    paired_bootstrap,
    seed_ttest,
    seeded_paired_test,
)


def _scores(rng, y, signal):
    return y * signal + rng.normal(0, 1, len(y))


def test_delong_aucs_and_known_answer():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    a, b = _scores(rng, y, 1.5), _scores(rng, y, 0.5)
    out = delong_test(y, a, b)
    assert out["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert out["auc_b"] == pytest.approx(roc_auc_score(y, b))
    assert out["diff"] > 0 and out["p"] < 1e-6
    assert out["z"] == pytest.approx(out["diff"] / out["se"])


def test_delong_variance_matches_a_bootstrap():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    common = rng.normal(0, 1, 500)
    a = y + common + 0.5 * rng.normal(0, 1, 500)
    b = y + common + 0.8 * rng.normal(0, 1, 500)
    out = delong_test(y, a, b)
    probs = [np.column_stack([1 - 1 / (1 + np.exp(-s)), 1 / (1 + np.exp(-s))]) for s in (a, b)]
    boot = paired_bootstrap(y, probs[0], probs[1], n_boot=2000, seed=0)
    assert boot["diff"] == pytest.approx(out["diff"])
    assert boot["se"] == pytest.approx(out["se"], rel=0.15)


def test_delong_identical_models_and_single_class():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 50)
    s = _scores(rng, y, 1.0)
    same = delong_test(y, s, s)
    assert same["diff"] == 0 and same["p"] == 1.0
    assert np.isnan(delong_test(np.ones(10, int), s[:10], s[:10])["p"])
    with pytest.raises(ValueError, match="binary"):
        delong_test(np.array([0, 1, 2]), np.zeros(3), np.zeros(3))


def test_delong_is_calibrated_under_the_null():
    rng = np.random.default_rng(3)
    pvals = []
    for _ in range(200):
        y = rng.integers(0, 2, 120)
        pvals.append(delong_test(y, _scores(rng, y, 1.0), _scores(rng, y, 1.0))["p"])
    assert 0.02 <= np.mean(np.array(pvals) < 0.05) <= 0.09


def test_paired_bootstrap_multiclass_detects_a_better_model():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 300)

    def probs(signal):
        logits = rng.normal(0, 1, (300, 3))
        logits[np.arange(300), y] += signal
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    out = paired_bootstrap(y, probs(2.0), probs(0.5), n_boot=300, seed=0)
    assert out["diff"] > 0 and out["lo"] > 0 and out["p"] < 0.01
    null = paired_bootstrap(y, probs(1.0), probs(1.0), n_boot=300, seed=0)
    assert null["lo"] < 0 < null["hi"] or null["p"] > 0.01


def test_seed_ttest_is_welch_and_two_sided():
    a, b = [0.80, 0.82, 0.81, 0.83, 0.79], [0.75, 0.78, 0.74, 0.77, 0.70]
    out = seed_ttest(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert out["p"] == pytest.approx(ref.pvalue) and out["test"] == "welch t"
    assert seed_ttest(b, a)["p"] == pytest.approx(out["p"])
    paired = seed_ttest(a, b, paired=True)
    assert paired["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)


def test_seed_ttest_zero_variance_and_too_few_seeds():
    assert seed_ttest([0.8] * 3, [0.8] * 3)["p"] == 1.0
    differ = seed_ttest([0.8] * 3, [0.7] * 3)
    assert differ["p"] == 0.0 and differ["t"] == np.inf
    assert np.isnan(seed_ttest([0.8], [0.7, 0.71])["p"])
    with pytest.raises(ValueError, match="finite"):
        seed_ttest([0.8, np.nan], [0.7, 0.71])


@pytest.mark.parametrize(("method", "ref"), [("holm", "holm"), ("bh", "fdr_bh")])
def test_adjust_pvalues_matches_statsmodels_and_keeps_nan(method, ref):
    p = np.array([0.01, 0.04, 0.03, 0.5, np.nan, 0.002])
    got = adjust_pvalues(p, method)
    ok = np.isfinite(p)
    np.testing.assert_allclose(got[ok], multipletests(p[ok], method=ref)[1])
    assert np.isnan(got[4])
    with pytest.raises(ValueError, match="holm"):
        adjust_pvalues(p, "bonferroni")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the deciding test


def _probs(scores: np.ndarray) -> np.ndarray:
    p1 = 1 / (1 + np.exp(-scores))
    return np.column_stack([1 - p1, p1])


def test_auroc_influence_matches_sklearn_binary_and_multiclass():
    rng = np.random.default_rng(10)
    y = rng.integers(0, 2, 300)
    s = y + rng.normal(0, 1, 300)
    auc, phi = auroc_influence(y, _probs(s))
    assert auc == pytest.approx(roc_auc_score(y, s))
    assert phi.sum() == pytest.approx(0, abs=1e-12)
    y3 = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3))
    logits[np.arange(300), y3] += 1.0
    p3 = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert auroc_influence(y3, p3)[0] == pytest.approx(auroc(y3, p3))


def test_unclustered_influence_variance_is_delongs():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 400)
    a, b = y + rng.normal(0, 1, 400), y + rng.normal(0, 1.2, 400)
    ref = delong_test(y, a, b)
    phi = auroc_influence(y, _probs(a))[1] - auroc_influence(y, _probs(b))[1]
    var, k = clustered_variance(phi, None)
    assert k == 400 and np.sqrt(var) == pytest.approx(ref["se"], rel=0.01)


def test_clustered_variance_matches_a_patient_bootstrap():
    """Patients with four highly correlated images: the clustered SE is about twice the naive
    one, and agrees with resampling patients."""
    rng = np.random.default_rng(12)
    n_pat = 150
    pid = np.repeat(np.arange(n_pat), 4)
    y = np.repeat(rng.integers(0, 2, n_pat), 4)
    shared = np.repeat(rng.normal(0, 1, n_pat), 4)
    s = y + shared + 0.3 * rng.normal(0, 1, len(y))
    auc, phi = auroc_influence(y, _probs(s))
    var_cl, k = clustered_variance(phi, pid)
    var_naive, _ = clustered_variance(phi, None)
    assert k == n_pat and var_cl > 2.5 * var_naive
    boot = paired_bootstrap(
        y, _probs(s), _probs(np.zeros(len(y)) + 0.5 * y), n_boot=1500, seed=0, cluster=pid
    )
    reps = []
    for i in range(600):
        draw = np.random.default_rng(i).integers(0, n_pat, n_pat)
        rows = np.concatenate([np.flatnonzero(pid == d) for d in draw])
        reps.append(roc_auc_score(y[rows], s[rows]))
    assert np.sqrt(var_cl) == pytest.approx(np.std(reps), rel=0.15)
    assert np.isfinite(boot["se"])


def test_seeded_test_counts_seed_variance_when_the_test_set_adds_none():
    """Identical per-image ranking within a seed, a different quality per seed: only the seeds
    vary, and the interval must be as wide as a two-sample t over seeds says."""
    rng = np.random.default_rng(13)
    y = rng.integers(0, 2, 500)
    base = y + rng.normal(0, 1, 500)
    a = [_probs(base * (1 + 0.05 * k)) for k in range(3)]
    b = [_probs(base + 0.2 * rng.normal(0, 1, 500)) for _ in range(3)]
    res = seeded_paired_test(y, a, b)
    assert res.var_seeds > 0 and res.var_test > 0
    assert res.se**2 == pytest.approx(res.var_test + res.var_seeds)
    assert res.df < 499  # few seeds pull the degrees of freedom down
    assert res.lo < res.diff < res.hi and 0 <= res.p <= 1


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("one seed", "fewer than two seeds"),
        ("single class", "single class"),
        ("identical", "zero variance"),
    ],
)
def test_seeded_test_degenerate_cases_are_undetermined(case, reason):
    rng = np.random.default_rng(14)
    y = rng.integers(0, 2, 60)
    s = _probs(y + rng.normal(0, 1, 60))
    if case == "one seed":
        res = seeded_paired_test(y, [s], [s, s])
    elif case == "single class":
        res = seeded_paired_test(np.ones(60, int), [s, s], [s, s])
    else:
        res = seeded_paired_test(y, [s, s], [s, s])
    assert reason in res.undetermined and np.isnan(res.p)


def test_detectable_difference_shrinks_with_the_standard_error():
    wide, narrow = detectable_difference(0.04, 100, 0.05), detectable_difference(0.01, 100, 0.05)
    assert wide == pytest.approx(4 * narrow)
    assert narrow == pytest.approx((stats.t.ppf(0.975, 100) + stats.t.ppf(0.8, 100)) * 0.01)
    assert np.isnan(detectable_difference(float("nan"), 10, 0.05))
