"""Does an FM do better on data that aligns with its pre-training data? (STUDY.md finding 1)

Input: one row per adaptation run, ``fm_site, task, task_site, seed, <metric>`` (``auroc`` by
default). An FM is *aligned* with a task when ``fm_site == task_site``. The headline is the
fraction of tasks that have an aligned FM in which that FM is significantly better than every
other FM (the study found about one third).
"""

from __future__ import annotations

from typing import Any, Literal

import pandas as pd

from retfm.evaluation.statistics import adjust_pvalues, seed_ttest

RESULT_COLUMNS = ("fm_site", "task", "task_site", "seed")


def _check(results: pd.DataFrame, metric: str) -> None:
    missing = [c for c in (*RESULT_COLUMNS, metric) if c not in results.columns]
    if missing:
        raise ValueError(f"alignment results: missing column(s) {missing}")
    sites = results.groupby("task")["task_site"].nunique()
    if (sites > 1).any():
        raise ValueError(f"alignment results: task {sites[sites > 1].index[0]!r} has several sites")


def alignment_matrix(results: pd.DataFrame, metric: str = "auroc") -> pd.DataFrame:
    """Mean ``metric`` per FM site (rows) x data site (columns), over tasks and seeds."""
    _check(results, metric)
    table = results.pivot_table(index="fm_site", columns="task_site", values=metric, aggfunc="mean")
    return table.rename_axis(index="fm_site", columns="task_site")


def aligned_comparisons(
    results: pd.DataFrame, metric: str = "auroc", *, paired: bool = False
) -> pd.DataFrame:
    """Aligned FM vs each other FM, per task that has an aligned FM: a t-test over seeds.

    Columns: task, task_site, aligned_fm, other_fm, mean_aligned, mean_other, diff, p, test.
    """
    _check(results, metric)
    rows = []
    for task, runs in results.groupby("task", sort=True):
        site = runs["task_site"].iloc[0]
        if site not in set(runs["fm_site"]):
            continue
        aligned = runs.loc[runs["fm_site"] == site].sort_values("seed")
        for other, other_runs in runs[runs["fm_site"] != site].groupby("fm_site", sort=True):
            other_runs = other_runs.sort_values("seed")
            res = seed_ttest(aligned[metric], other_runs[metric], paired=paired)
            rows.append(
                {
                    "task": task,
                    "task_site": site,
                    "aligned_fm": site,
                    "other_fm": other,
                    "mean_aligned": res["mean_a"],
                    "mean_other": res["mean_b"],
                    "diff": res["diff"],
                    "p": res["p"],
                    "test": res["test"],
                }
            )
    return pd.DataFrame(rows)


def alignment_summary(
    comparisons: pd.DataFrame,
    *,
    alpha: float = 0.05,
    correction: Literal["holm", "bh"] = "holm",
    tasks: list[str] | None = None,
) -> dict[str, Any]:
    """Per task, is the aligned FM significantly better than every other FM?

    ``comparisons`` holds task, aligned_fm, other_fm, diff (aligned - other) and p, from
    :func:`aligned_comparisons` or from per-image tests (DeLong). p-values are adjusted across all
    comparisons. ``tasks`` (all tasks of the study) lets the summary name those without an
    aligned FM. Returns n_tasks, n_better, fraction, better_tasks, tasks_without_aligned_fm and
    the annotated ``comparisons`` / ``per_task`` frames.
    """
    needed = ("task", "aligned_fm", "other_fm", "diff", "p")
    missing = [c for c in needed if c not in comparisons.columns]
    if missing:
        raise ValueError(f"alignment comparisons: missing column(s) {missing}")
    table = comparisons.copy()
    table["p_adj"] = adjust_pvalues(table["p"].to_numpy(), correction) if len(table) else []
    table["significant"] = (table["p_adj"] < alpha).fillna(False).astype(bool)
    table["aligned_better"] = table["significant"] & (table["diff"] > 0)
    per_task = (
        table.groupby("task", sort=True)
        .agg(
            aligned_fm=("aligned_fm", "first"),
            min_diff=("diff", "min"),
            max_p_adj=("p_adj", "max"),
            aligned_better=("aligned_better", "all"),
        )  # fmt: skip
        .reset_index()
    )
    n_tasks = len(per_task)
    n_better = int(per_task["aligned_better"].sum()) if n_tasks else 0
    without = sorted(set(tasks or []) - set(per_task["task"]))
    return {
        "n_tasks": n_tasks,
        "n_better": n_better,
        "fraction": n_better / n_tasks if n_tasks else float("nan"),
        "better_tasks": per_task.loc[per_task["aligned_better"], "task"].tolist(),
        "tasks_without_aligned_fm": without,
        "alpha": alpha,
        "correction": correction,
        "comparisons": table,
        "per_task": per_task,
    }
