import numpy as np
import pytest

from retfm.evaluation.factors import factor_effects
from retfm.evaluation.subgroups import add_groups

BINS = {"age": [60.0]}


def _pair(simulate_preds, seed, **effects):
    a = add_groups(simulate_preds(250, seed=seed, **effects), BINS)
    b = add_groups(simulate_preds(250, seed=seed, fm_shift=0.3, **effects), BINS)
    return {"fm_a": a, "fm_b": b}


def test_planted_age_effect_is_flagged_and_sex_is_not(simulate_preds):
    out = factor_effects(_pair(simulate_preds, 1, age_effect=1.2), ["age", "sex", "ethnicity"])
    out = out.set_index("factor")
    assert out.loc["age", "perf_flagged"]
    assert not out.loc["sex", "perf_flagged"] and not out.loc["ethnicity", "perf_flagged"]
    assert out.loc["age", "perf_effect"] > 0.1 and out.loc["age", "perf_auroc_gap"] > 0.1
    assert out.loc["age", "perf_p_adj"] >= out.loc["age", "perf_p"]


def test_planted_gap_change_is_flagged(simulate_preds):
    pair = _pair(simulate_preds, 2)
    # FM b only loses quality in older patients: the factor changes the gap between FMs.
    worse = add_groups(simulate_preds(250, seed=2, fm_shift=0.3, age_effect=1.5), BINS)
    out = factor_effects({"fm_a": pair["fm_a"], "fm_b": worse}, ["age", "sex"]).set_index("factor")
    assert out.loc["age", "gap_flagged"] and out.loc["age", "gap_effect"] > 0.1
    assert not out.loc["sex", "gap_flagged"]


def test_no_effect_flag_rate_stays_near_alpha(simulate_preds):
    flags = []
    for seed in range(40):
        out = factor_effects(_pair(simulate_preds, 100 + seed), ["sex"], alpha=0.05)
        flags.append([out["perf_flagged"].iloc[0], out["gap_flagged"].iloc[0]])
    assert np.mean(flags, axis=0).max() <= 0.15


def test_single_fm_asks_only_the_performance_question(simulate_preds):
    preds = add_groups(simulate_preds(150, seed=3), BINS)
    out = factor_effects({"only": preds}, ["age"])
    assert np.isfinite(out["perf_p"].iloc[0]) and np.isnan(out["gap_p"].iloc[0])


def test_small_and_unknown_groups_are_left_out(simulate_preds):
    pair = _pair(simulate_preds, 4)
    for preds in pair.values():
        preds.loc[preds.index < 5, "group.sex"] = "X"
        preds.loc[preds.index >= len(preds) - 20, "group.sex"] = "unknown"
    out = factor_effects(pair, ["sex"], min_group_size=10)
    assert out["left_out"].iloc[0] == ["X", "unknown"] and out["groups"].iloc[0] == ["F", "M"]


def test_bad_predictions_name_the_fm(simulate_preds):
    pair = _pair(simulate_preds, 5)
    pair["fm_b"] = pair["fm_b"].drop(columns="y_true")
    with pytest.raises(ValueError, match="FM 'fm_b'.*y_true"):
        factor_effects(pair, ["sex"])
