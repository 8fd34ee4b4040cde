import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from retfm.evaluation.metrics import ece, overall_metrics


def _probs(rng, y, k, signal=1.5):
    logits = rng.normal(0, 1, (len(y), k))
    logits[np.arange(len(y)), y] += signal
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = _probs(rng, y, 2)
    out = overall_metrics(y, p)
    assert out["auroc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert out["aupr"] == pytest.approx(average_precision_score(y, p[:, 1]))
    assert out["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
    assert set(out) == {"auroc", "aupr", "accuracy", "f1_macro", "kappa", "ece"}
    assert 0.5 < out["auroc"] < 1 and 0 < out["kappa"] < 1


def test_multiclass_auroc_is_one_vs_rest_macro():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 400)
    p = _probs(rng, y, 4)
    out = overall_metrics(y, p)
    assert out["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_multiclass_with_an_absent_class_averages_present_classes():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)  # class 2 never occurs
    p = _probs(rng, y, 3)
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 1)])
    assert overall_metrics(y, p)["auroc"] == pytest.approx(expected)


def test_single_class_is_nan_never_zero():
    y = np.ones(20, dtype=int)
    p = np.tile([0.3, 0.7], (20, 1))
    out = overall_metrics(y, p)
    assert np.isnan(out["auroc"]) and np.isnan(out["aupr"]) and np.isnan(out["kappa"])
    assert out["accuracy"] == 1.0


def test_ece_zero_when_calibrated_and_large_when_overconfident():
    # 10 predictions at confidence 0.8, 8 of them right: perfectly calibrated.
    y = np.array([1] * 8 + [0] * 2)
    p = np.tile([0.2, 0.8], (10, 1))
    assert ece(y, p) == pytest.approx(0.0)
    assert ece(1 - y, p) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1], [[0.5, 0.6], [0.5, 0.5]], "row 0"),
        ([0, 2], [[0.5, 0.5], [0.5, 0.5]], "row 1: class index 2"),
        ([0, 1], [[1.0], [1.0]], "K >= 2"),
        ([0, 1, 1], [[0.5, 0.5], [0.5, 0.5]], "y_true: expected shape"),
    ],
)
def test_bad_input_names_the_row(y, p, message):
    with pytest.raises(ValueError, match=message):
        overall_metrics(np.array(y), np.array(p))
