import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from retfm.evaluation.fairness import (
    SINGLE_CLASS,
    TOO_SMALL,
    fairness_summary,
    metric_keys,
    slug,
    subgroup_table,
)
from retfm.evaluation.metrics import overall_metrics
from retfm.evaluation.subgroups import add_groups, group_column

BINS = {"age": [60.0], "age_fine": [40.0, 60.0, 80.0]}


@pytest.fixture
def grouped(simulate_preds):
    return add_groups(simulate_preds(200, seed=3), BINS, intersections=["age*sex"])


def _with_single_class_group(preds):
    preds = preds.copy()
    preds["site"] = np.where(preds.index < 30, "tiny", "big")
    preds.loc[preds.index < 30, "y_true"] = 0  # 'tiny' holds negatives only
    preds[group_column("site")] = preds["site"]
    return preds


def test_table_matches_direct_computation(grouped):
    table = subgroup_table(grouped, "sex", min_group_size=10)
    assert list(table["group"]) == ["F", "M"]
    for row in table.itertuples():
        part = grouped[grouped["sex"] == row.group]
        assert row.n == len(part) and row.n_pos == int((part["y_true"] == 1).sum())
        assert row.auroc == pytest.approx(roc_auc_score(part["y_true"], part["prob_1"]))
        called = part["prob_1"] > part["prob_0"]
        assert row.tpr == pytest.approx(called[part["y_true"] == 1].mean())
        assert row.fpr == pytest.approx(called[part["y_true"] == 0].mean())
        assert row.selection_rate == pytest.approx(called.mean())
        assert row.defined and row.reason == ""
    assert table["n"].sum() == len(grouped)


def test_single_class_group_is_undefined_not_zero(grouped):
    table = subgroup_table(_with_single_class_group(grouped), "site", min_group_size=10)
    tiny = table.set_index("group").loc["tiny"]
    assert not tiny["defined"] and tiny["reason"] == SINGLE_CLASS
    assert np.isnan(tiny["auroc"]) and np.isnan(tiny["tpr"])  # fairlearn-style 0 would lie
    assert tiny["n_pos"] == 0 and tiny["n_neg"] == 30


def test_small_group_is_undefined(grouped):
    table = subgroup_table(grouped, "age_fine", min_group_size=10_000)
    assert (~table["defined"]).all() and set(table["reason"]) == {TOO_SMALL}


def test_multiclass_positive_means_any_disease(simulate_preds):
    preds = add_groups(simulate_preds(100, n_classes=3), BINS)
    table = subgroup_table(preds, "sex", min_group_size=5)
    for row in table.itertuples():
        part = preds[preds["sex"] == row.group]
        assert row.n_pos == int((part["y_true"] > 0).sum())
        probs = part[["prob_0", "prob_1", "prob_2"]].to_numpy()
        assert row.auroc == pytest.approx(overall_metrics(part["y_true"], probs)["auroc"])


def test_summary_gaps_and_es_auc(grouped):
    table = subgroup_table(grouped, "age_fine", min_group_size=10)
    overall = overall_metrics(grouped["y_true"], grouped[["prob_0", "prob_1"]])["auroc"]
    s = fairness_summary(table, overall)
    auc = table["auroc"]
    assert s["gap"] == pytest.approx(auc.max() - auc.min())
    assert s["worst"] == pytest.approx(auc.min())
    assert s["worst_group"] == table.loc[auc.idxmin(), "group"]
    assert s["es_auc"] == pytest.approx(overall / (1 + np.abs(overall - auc).sum()))
    eod = max(np.ptp(table["tpr"]), np.ptp(table["fpr"]))
    assert s["eod"] == pytest.approx(eod)
    assert s["dpd"] == pytest.approx(np.ptp(table["selection_rate"]))
    assert s["complete"] and s["undefined"] == []


def test_summary_says_incomplete_and_names_undefined(grouped):
    table = subgroup_table(_with_single_class_group(grouped), "site", min_group_size=10)
    s = fairness_summary(table, 0.8)
    assert not s["complete"] and s["undefined"] == ["tiny"] and s["n_undefined"] == 1
    assert np.isnan(s["gap"])  # one defined group left: no gap, not 0


def test_unknown_group_reported_but_kept_out_of_gap(grouped):
    preds = grouped.copy()
    preds.loc[preds.index < 40, group_column("sex")] = "unknown"
    table = subgroup_table(preds, "sex", min_group_size=10)
    assert "unknown" in set(table["group"])
    s = fairness_summary(table, 0.8)
    assert s["excluded"] == ["unknown"] and s["complete"]
    known = table[table["group"] != "unknown"]["auroc"]
    assert s["gap"] == pytest.approx(known.max() - known.min())


@pytest.mark.parametrize(
    ("label", "expected"),
    [("<60", "lt60"), (">=60", "ge60"), ("80+", "80plus"), ("40-59", "40-59"),
     ("age*sex", "age_x_sex"), ("<60 & F", "lt60_x_F"), ("east asian/other", "east_asian_other")],
)  # fmt: skip
def test_slug(label, expected):
    assert slug(label) == expected


def test_metric_keys_are_valid_mlflow_names_and_map_back(grouped):
    from mlflow.utils.validation import _validate_metric_name

    preds = _with_single_class_group(grouped)
    tables = [subgroup_table(preds, f, min_group_size=10) for f in ("age", "age_fine", "site")]
    tables.append(subgroup_table(preds, "age*sex", min_group_size=10))
    summaries = [fairness_summary(t, 0.8) for t in tables]
    keys = metric_keys({"auroc": 0.8, "kappa": float("nan")}, tables, summaries)
    for key in [*keys.metrics, *keys.undefined]:
        _validate_metric_name(key)  # raises on a character MLflow rejects
    assert keys.labels["auroc/age/lt60"] == "auroc/age=<60"
    assert keys.labels["auroc/age_fine/80plus"] == "auroc/age_fine=80+"
    assert keys.labels["gap/auroc/age"] == "gap/auroc/age"
    assert "n/site/tiny" in keys.metrics and "auroc/site/tiny" not in keys.metrics
    assert {"auroc/site/tiny", "kappa", "gap/auroc/site"} <= set(keys.undefined)
    assert all(np.isfinite(v) for v in keys.metrics.values())
    assert keys.metrics["n/age/ge60"] == (grouped["age"] >= 60).sum()


def test_colliding_labels_raise():
    table = pd.DataFrame(
        {"factor": "eth", "group": ["a/b", "a_b"], "n": 10, "n_pos": 5, "n_neg": 5,
         "auroc": 0.7, "accuracy": 0.7, "tpr": 0.5, "fpr": 0.5, "ece": 0.1,
         "selection_rate": 0.5, "defined": True}
    )  # fmt: skip
    with pytest.raises(ValueError, match="would stand for both"):
        metric_keys({}, [table], [])


@pytest.mark.e2e
def test_keys_log_to_a_real_mlflow_store(grouped, tmp_path):
    import mlflow

    tables = [subgroup_table(grouped, f, min_group_size=10) for f in ("age_fine", "age*sex")]
    keys = metric_keys({"auroc": 0.8}, tables, [fairness_summary(t, 0.8) for t in tables])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        mlflow.log_metrics(keys.metrics)
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert logged == pytest.approx(keys.metrics)
