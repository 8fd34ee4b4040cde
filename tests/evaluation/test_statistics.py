import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from statsmodels.stats.multitest import multipletests

from retfm.evaluation.statistics import adjust_pvalues, delong_test, paired_bootstrap, seed_ttest


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
