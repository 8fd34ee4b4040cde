import numpy as np
import pandas as pd
import pytest

from retfm.evaluation.alignment import alignment_matrix, alignment_verdicts
from retfm.evaluation.comparison import compare_fms
from retfm.evaluation.simulation import bonus_for_difference, demo_like_design, simulate_study

FM_SITES = {"hospital": "hospital", "screening": "screening"}
TASK_SITES = {"hospital_dr": "hospital", "screening_dr": "screening", "public_dr": "public"}


def _table(rows):
    base = {"diff": 0.0, "p_adj": 0.5, "verdict": "no evidence"}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_verdicts_per_task_and_headline():
    comparisons = _table(
        [
            {
                "task": "hospital_dr",
                "fm_a": "hospital",
                "fm_b": "screening",
                "diff": 0.08,
                "p_adj": 0.001,
                "verdict": "hospital better",
            },
            {"task": "screening_dr", "fm_a": "hospital", "fm_b": "screening", "diff": 0.01},
            {
                "task": "public_dr",
                "fm_a": "hospital",
                "fm_b": "screening",
                "diff": 0.09,
                "p_adj": 0.001,
                "verdict": "hospital better",
            },
        ]
    )
    per_task, head = alignment_verdicts(comparisons, FM_SITES, TASK_SITES)
    verdicts = dict(zip(per_task["task"], per_task["verdict"], strict=True))
    assert verdicts == {"hospital_dr": "better", "screening_dr": "no evidence"}
    assert head["n_better"] == 1 and head["n_decided"] == 2 and head["fraction"] == 0.5
    assert head["tasks_without_aligned_fm"] == ["public_dr"]
    # the diff is signed aligned - other: screening is fm_b on its own task
    assert per_task.set_index("task").loc["screening_dr", "min_diff"] == pytest.approx(-0.01)


def test_aligned_worse_is_worse_not_no():
    comparisons = _table(
        [
            {
                "task": "screening_dr",
                "fm_a": "hospital",
                "fm_b": "screening",
                "diff": 0.1,
                "p_adj": 0.001,
                "verdict": "hospital better",
            }
        ]
    )
    per_task, head = alignment_verdicts(comparisons, FM_SITES, {"screening_dr": "screening"})
    assert per_task["verdict"].tolist() == ["worse"]
    assert head["n_worse"] == 1 and head["n_better"] == 0 and head["n_decided"] == 1


def test_undetermined_tasks_are_listed_and_not_counted():
    reason = "undetermined (fewer than two seeds: the training variation cannot be estimated)"
    comparisons = _table(
        [
            {
                "task": "hospital_dr",
                "fm_a": "hospital",
                "fm_b": "screening",
                "verdict": reason,
                "p_adj": np.nan,
            },
            {"task": "screening_dr", "fm_a": "hospital", "fm_b": "screening"},
        ]
    )
    _, head = alignment_verdicts(comparisons, FM_SITES, TASK_SITES)
    assert head["n_undetermined"] == 1 and head["n_decided"] == 1
    assert head["undetermined_tasks"] == {"hospital_dr": reason}
    assert head["fraction"] == 0.0  # 0 of the 1 decided task, not 0 of 2


def test_nothing_decided_gives_no_fraction():
    _, head = alignment_verdicts(_table([]).iloc[0:0], FM_SITES, {"hospital_dr": "hospital"})
    assert head["fraction"] is None and head["n_undetermined"] == 1


def test_planted_advantage_is_found_where_planted_and_only_there():
    design = demo_like_design(1500)
    task = design.tasks[0]  # hospital_dr
    planted = design.with_effects(alignment={task.name: bonus_for_difference(task, design, 0.1)})
    preds = simulate_study(planted, 0)
    per_task, head = alignment_verdicts(compare_fms(preds), FM_SITES, TASK_SITES)
    verdicts = dict(zip(per_task["task"], per_task["verdict"], strict=True))
    assert verdicts == {"hospital_dr": "better", "screening_dr": "no evidence"}
    assert head["better_tasks"] == ["hospital_dr"]


def test_matrix_is_fm_by_data_site():
    runs = pd.DataFrame(
        {
            "fm": ["hospital", "hospital", "screening", "screening"],
            "task_site": ["hospital", "public", "hospital", "public"],
            "auroc": [0.8, 0.7, 0.75, 0.72],
        }
    )
    matrix = alignment_matrix(runs, FM_SITES)
    assert list(matrix.index) == ["hospital", "screening"]
    assert list(matrix.columns) == ["hospital", "public"]
    assert matrix.loc["screening", "public"] == pytest.approx(0.72)
    with pytest.raises(ValueError, match="task_site"):
        alignment_matrix(runs.drop(columns="task_site"), FM_SITES)
