import numpy as np
import pytest

from retfm.evaluation.comparison import compare_fms, seed_arrays
from retfm.evaluation.simulation import bonus_for_difference, demo_like_design, simulate_study


def test_every_pair_on_every_task_with_one_adjusted_family():
    preds = simulate_study(demo_like_design(300), 0)
    table = compare_fms(preds)
    assert len(table) == 3 and set(table["task"]) == {"hospital_dr", "screening_dr", "public_dr"}
    assert (table["p_adj"] >= table["p"]).all()
    assert (table["lo"] < table["diff"]).all() and (table["diff"] < table["hi"]).all()
    assert table["detectable"].gt(0).all()
    assert "p_seed_ttest" in table  # shown, labelled, never the verdict


def test_a_planted_difference_is_called_for_the_right_fm():
    design = demo_like_design(1500)
    task = design.tasks[1]  # screening_dr: the screening FM gets 0.08 AUROC more
    preds = simulate_study(
        design.with_effects(alignment={task.name: bonus_for_difference(task, design, 0.08)}), 1
    )
    row = compare_fms(preds).set_index("task").loc["screening_dr"]
    assert row["verdict"] == "screening better" and row["diff"] < 0 and row["hi"] < 0


def test_one_seed_is_undetermined_and_outside_the_family():
    preds = simulate_study(demo_like_design(200), 2)
    key = ("hospital", "public_dr")
    preds[key] = preds[key][preds[key]["seed"] == 0]
    table = compare_fms(preds).set_index("task")
    assert table.loc["public_dr", "verdict"].startswith("undetermined (fewer than two seeds")
    assert np.isnan(table.loc["public_dr", "p_adj"])
    assert table["p_adj"].notna().sum() == 2


def test_seeds_scoring_other_images_are_refused():
    preds = simulate_study(demo_like_design(100), 3)
    frame = preds[("hospital", "hospital_dr")]
    frame = frame.drop(frame.index[(frame["seed"] == 1)][:1])
    with pytest.raises(ValueError, match="FM hospital, task hospital_dr: seed 1 scored other"):
        seed_arrays(frame, "FM hospital, task hospital_dr")


def test_recipes_restrict_the_pairs():
    preds = simulate_study(demo_like_design(100), 4)
    table = compare_fms(preds, same_recipe={"hospital": "mae", "screening": "dinov2"})
    assert table.empty


def test_a_test_set_with_one_class_is_undetermined_not_an_error():
    preds = simulate_study(demo_like_design(200), 5)
    for fm in ("hospital", "screening"):
        frame = preds[(fm, "hospital_dr")]
        preds[(fm, "hospital_dr")] = frame[frame["y_true"] == 1]  # no AUROC in any seed
    table = compare_fms(preds).set_index("task")
    assert table.loc["hospital_dr", "verdict"].startswith("undetermined"), table
    assert np.isnan(table.loc["hospital_dr", "p_seed_ttest"])
