import numpy as np
import pandas as pd
import pytest

from retfm.evaluation.comparison import seed_average
from retfm.evaluation.factors import factor_effects, placement
from retfm.evaluation.simulation import TaskDesign, demo_like_design, simulate_study
from retfm.evaluation.statistics import auroc_influence
from retfm.evaluation.subgroups import add_groups

BINS = {"age": [60.0], "age_fine": [40.0, 60.0, 80.0]}
FACTORS = ["age", "age_fine", "sex", "ethnicity"]


def _grouped(preds):
    return {k: add_groups(seed_average(v), BINS) for k, v in preds.items()}


def _flags(design, seed, factors=FACTORS):
    out, _ = factor_effects(_grouped(simulate_study(design, seed)), factors)
    return out.set_index("factor")


def test_placement_means_are_the_class_aurocs():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    logits = rng.normal(0, 1, (400, 3))
    logits[np.arange(400), y] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    v = placement(y, probs)
    for c in range(3):
        ovr = auroc_influence(
            (y == c).astype(int), np.column_stack([1 - probs[:, c], probs[:, c]])
        )[0]
        assert v[y == c].mean() == pytest.approx(ovr)
    assert np.isnan(placement(np.zeros(5, int), probs[:5])).all()


def test_planted_age_effect_is_flagged_and_sex_and_ethnicity_are_not():
    design = demo_like_design(600).with_effects(age=0.9)
    out = _flags(design, 1)
    assert out.loc["age", "perf_verdict"] == "effect"
    assert out.loc["sex", "perf_verdict"] == "no evidence"
    assert out.loc["ethnicity", "perf_verdict"] == "no evidence"
    assert out.loc["age", "perf_p_adj"] >= out.loc["age", "perf_p"]
    assert out.loc["age", "auroc_gap"] > 0.05


def test_effect_sizes_point_the_right_way():
    design = demo_like_design(600).with_effects(age=0.9)
    _, groups = factor_effects(_grouped(simulate_study(design, 2)), ["age"])
    older = groups[(groups["factor"] == "age") & (groups["group"] == ">=60")].iloc[0]
    assert older["auroc_diff"] < 0 and older["hi"] < 0  # the old are ranked worse
    assert groups[groups["reference"]]["group"].tolist() == ["<60"]  # the largest group


def test_tasks_that_differ_in_mix_and_difficulty_are_not_factor_effects():
    """The confounded null: one easy task of young East Asian patients, one hard task of old
    white patients, no effect inside either. Pooling without task strata flags age and
    ethnicity here; the stratified test must not."""
    young = TaskDesign(
        "easy",
        "a",
        800,
        2,
        separation=1.8,
        age_mean=40,
        age_sd=8,
        ethnicity={"east_asian": 0.95, "white": 0.05},
    )
    old = TaskDesign(
        "hard",
        "b",
        800,
        2,
        separation=0.5,
        age_mean=72,
        age_sd=8,
        ethnicity={"white": 0.9, "east_asian": 0.1},
        disease_logit=0.8,
    )
    design = demo_like_design().__class__({"a": "a", "b": "b"}, (young, old), seeds=2)
    flagged = [
        _flags(design, s, ["age", "ethnicity"])[["perf_flagged", "gap_flagged"]].any(axis=1)
        for s in range(12)
    ]
    assert np.mean([f.any() for f in flagged]) <= 1 / 12


def test_a_factor_that_changes_the_gap_between_fms():
    """FM b alone loses quality in the old: the gap question flags age."""
    design = demo_like_design(800)
    preds = simulate_study(design, 4)
    aged = simulate_study(design.with_effects(age=1.2), 4)  # same draws, FM b's old see less
    mixed = {k: (aged[k] if k[0] == "screening" else v) for k, v in preds.items()}
    out, _ = factor_effects(_grouped(mixed), ["age", "sex"])
    out = out.set_index("factor")
    assert out.loc["age", "gap_verdict"] == "effect"
    assert out.loc["sex", "gap_verdict"] == "no evidence"


def test_small_and_unknown_groups_are_left_out_and_reported():
    preds = _grouped(simulate_study(demo_like_design(300), 4))
    for (_, task), frame in preds.items():
        if task == "hospital_dr":  # 5 images in one task: below min_group_size overall
            frame.loc[frame.index < 5, "group.sex"] = "X"
        frame.loc[frame.index >= len(frame) - 20, "group.sex"] = "unknown"
    out, _ = factor_effects(preds, ["sex"], min_group_size=10)
    assert out["left_out"].iloc[0] == ["X", "unknown"]
    assert sorted(out["groups"].iloc[0]) == ["F", "M"]


def test_one_group_is_undetermined_never_no_evidence():
    preds = _grouped(simulate_study(demo_like_design(200), 5))
    for frame in preds.values():
        frame["group.sex"] = "F"
    out, _ = factor_effects(preds, ["sex", "age"])
    row = out.set_index("factor").loc["sex"]
    assert row["perf_verdict"].startswith("undetermined (fewer than two groups")
    assert not row["perf_flagged"] and np.isnan(row["perf_p_adj"])


def test_one_fm_asks_only_the_performance_question():
    preds = {
        k: v
        for k, v in _grouped(simulate_study(demo_like_design(200), 6)).items()
        if k[0] == "hospital"
    }
    out, _ = factor_effects(preds, ["age"])
    assert np.isfinite(out["perf_p"].iloc[0])
    assert out["gap_verdict"].iloc[0] == "undetermined (one FM: no gap between FMs)"


def test_bad_predictions_name_the_fm_and_task():
    preds = _grouped(simulate_study(demo_like_design(100), 7))
    key = ("screening", "public_dr")
    preds[key] = preds[key].drop(columns="y_true")
    with pytest.raises(ValueError, match="FM 'screening', task 'public_dr'.*y_true"):
        factor_effects(preds, ["sex"])


def test_fms_scored_on_other_images_are_refused():
    preds = _grouped(simulate_study(demo_like_design(100), 8))
    key = ("screening", "hospital_dr")
    preds[key] = preds[key].iloc[1:].reset_index(drop=True)
    with pytest.raises(ValueError, match="hospital_dr.*other images"):
        factor_effects(preds, ["sex"])


def test_result_tables_have_the_documented_columns():
    out, groups = factor_effects(_grouped(simulate_study(demo_like_design(100), 9)), ["age"])
    for col in ("perf_p_adj", "perf_verdict", "gap_p_adj", "gap_verdict", "auroc_gap"):
        assert col in out
    assert isinstance(groups, pd.DataFrame)
    assert {"auroc_diff", "lo", "hi", "reference", "n_images"} <= set(groups.columns)
