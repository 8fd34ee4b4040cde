import numpy as np
import pandas as pd
import pytest

from retfm.evaluation.alignment import aligned_comparisons, alignment_matrix, alignment_summary

TASKS = {"h1": "hospital", "h2": "hospital", "s1": "screening", "s2": "screening", "p1": "public"}


def _results(advantage: dict[str, float], seed: int = 0) -> pd.DataFrame:
    """5 seeds per (FM, task); the aligned FM gets ``advantage[task]`` extra AUROC."""
    rng = np.random.default_rng(seed)
    rows = []
    for task, site in TASKS.items():
        for fm in ("hospital", "screening"):
            for s in range(5):
                bonus = advantage.get(task, 0.0) if fm == site else 0.0
                auroc = 0.8 + bonus + rng.normal(0, 0.01)
                rows.append({"fm_site": fm, "task": task, "task_site": site, "seed": s,
                             "auroc": auroc})  # fmt: skip
    return pd.DataFrame(rows)


def test_matrix_is_fm_site_by_data_site():
    results = _results({"h1": 0.05})
    matrix = alignment_matrix(results)
    assert list(matrix.index) == ["hospital", "screening"]
    assert list(matrix.columns) == ["hospital", "public", "screening"]
    hosp = results[(results["fm_site"] == "hospital") & (results["task_site"] == "hospital")]
    assert matrix.loc["hospital", "hospital"] == pytest.approx(hosp["auroc"].mean())


def test_planted_aligned_advantage_is_found():
    results = _results({"h1": 0.05, "s2": 0.05})  # aligned FM better in 2 of 4 aligned tasks
    summary = alignment_summary(aligned_comparisons(results), alpha=0.05, tasks=list(TASKS))
    assert summary["n_tasks"] == 4
    assert summary["better_tasks"] == ["h1", "s2"]
    assert summary["fraction"] == pytest.approx(0.5)
    assert summary["tasks_without_aligned_fm"] == ["p1"]
    assert {"p_adj", "significant"} <= set(summary["comparisons"].columns)


def test_aligned_worse_is_not_counted_as_better():
    summary = alignment_summary(aligned_comparisons(_results({"h1": -0.05})))
    assert summary["n_better"] == 0
    assert bool(summary["comparisons"].set_index("task").loc["h1", "significant"])


def test_no_effect_rarely_flags():
    flagged = [alignment_summary(aligned_comparisons(_results({}, seed=s)))["n_better"]
               for s in range(20)]  # fmt: skip
    assert np.mean(flagged) / 4 <= 0.1


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="task_site"):
        alignment_matrix(_results({}).drop(columns="task_site"))
