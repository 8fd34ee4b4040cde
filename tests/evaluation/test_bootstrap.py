import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from retfm.evaluation.bootstrap import (
    BinaryAuroc,
    MacroAuroc,
    auroc_replicates,
    bootstrap_intervals,
    cluster_index,
    draw_weights,
)
from retfm.evaluation.metrics import auroc
from retfm.evaluation.subgroups import add_groups

BINS = {"age": [60.0]}


def test_weighted_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 2, n)
    scores = np.round(rng.random(n) + 0.3 * y, 1)  # coarse scores: many ties
    weights = rng.integers(0, 4, (5, n)).astype(float)
    got = BinaryAuroc(scores, y == 1, np.arange(n))(weights)
    for b in range(5):
        assert got[b] == pytest.approx(roc_auc_score(y, scores, sample_weight=weights[b]))


def test_weighted_macro_auroc_matches_metric():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(3), 200)
    cl = np.arange(200)
    assert MacroAuroc(y, probs, cl)(np.ones((1, 200)))[0] == pytest.approx(auroc(y, probs))


def test_weights_are_bootstrap_counts():
    w = draw_weights(np.random.default_rng(0), 50, 7)
    assert w.shape == (7, 50) and (w.sum(axis=1) == 50).all() and (w >= 0).all()


def test_replicates_equal_a_plain_loop(simulate_preds):
    preds = simulate_preds(60, seed=2)
    y, probs = preds["y_true"].to_numpy(), preds[["prob_0", "prob_1"]].to_numpy()
    (est,), (reps,) = auroc_replicates(y, [probs], n_boot=20, seed=5, clusters=preds["patient_id"])
    cl, n_clusters = cluster_index(preds["patient_id"], len(y))
    weights = draw_weights(np.random.default_rng(5), n_clusters, 20)  # same stream, one chunk
    loop = [roc_auc_score(y, probs[:, 1], sample_weight=w[cl]) for w in weights]
    assert est == pytest.approx(roc_auc_score(y, probs[:, 1]))
    np.testing.assert_allclose(reps, loop)


def test_intervals_table(simulate_preds):
    preds = add_groups(simulate_preds(150, seed=3), BINS)
    out = bootstrap_intervals(preds, ["age", "sex"], n_boot=200, seed=1)
    assert list(out.columns) == [
        "factor", "group", "metric", "estimate", "lo", "hi", "n_boot_defined", "n"
    ]  # fmt: skip
    assert set(out["factor"]) == {"overall", "age", "sex"}
    assert len(out) == 2 * (1 + 2 + 2)
    overall = out[(out["factor"] == "overall") & (out["metric"] == "auroc")].iloc[0]
    assert overall["estimate"] == pytest.approx(roc_auc_score(preds["y_true"], preds["prob_1"]))
    assert (out["lo"] <= out["estimate"]).all() and (out["estimate"] <= out["hi"]).all()
    assert (out["n_boot_defined"] == 200).all()
    again = bootstrap_intervals(preds, ["age", "sex"], n_boot=200, seed=1)
    pd.testing.assert_frame_equal(out, again)


def test_resamples_patients_not_images(simulate_preds):
    one = simulate_preds(120, seed=4, max_images=1)
    # Every patient photographed four times with identical predictions: 4x the images, no
    # new information. Patient resampling keeps the interval; image resampling halves it.
    four = one.loc[one.index.repeat(4)].reset_index(drop=True)
    four["image_id"] = [f"i{i}" for i in range(len(four))]

    def width(preds, cluster):
        out = bootstrap_intervals(preds, [], n_boot=400, seed=0, cluster=cluster)
        row = out[out["metric"] == "auroc"].iloc[0]
        return row["hi"] - row["lo"]

    base = width(one, "patient_id")
    assert width(four, "patient_id") == pytest.approx(base, rel=0.2)
    assert width(four, None) < 0.65 * base


def test_rarely_two_class_group_counts_defined_replicates(simulate_preds):
    preds = simulate_preds(200, seed=5, max_images=1)
    preds["group.rare"] = "common"
    positives = preds.index[preds["y_true"] == 1]
    negatives = preds.index[preds["y_true"] == 0]
    preds.loc[[positives[0], *negatives[:9]], "group.rare"] = "rare"  # a single positive
    out = bootstrap_intervals(preds, ["rare"], n_boot=300, seed=0)
    rare = out[(out["group"] == "rare") & (out["metric"] == "auroc")].iloc[0]
    assert 100 < rare["n_boot_defined"] < 300  # the lone positive is missed ~37% of the time
    acc = out[(out["group"] == "rare") & (out["metric"] == "accuracy")].iloc[0]
    assert acc["n_boot_defined"] > 290


def test_bad_arguments(simulate_preds):
    preds = simulate_preds(20)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_intervals(preds, [], n_boot=0)
    with pytest.raises(ValueError, match="no groups for factor 'age'"):
        bootstrap_intervals(preds, ["age"], n_boot=10)
