"""Does an FM do better on data that aligns with its pre-training data? (STUDY.md finding 1)

An FM is *aligned* with a task when the FM's pre-training site is the task's data site. Per task
that has an aligned FM, the aligned FM is compared with every FM that is not aligned (the
paired seeded test of :mod:`retfm.evaluation.comparison`, p adjusted over the whole study), and
the task is decided as:

* ``better``: significantly better than every non-aligned FM;
* ``worse``: significantly worse than at least one;
* ``undetermined (reason)``: some comparison could not be made (and none says worse);
* ``no evidence`` otherwise.

The headline is the fraction of *decided* tasks (better, worse or no evidence) where the aligned
FM is better (the published study found about one third); undetermined tasks are listed, never
counted as a "no".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from retfm.evaluation.verdicts import BETTER, NO_EVIDENCE, WORSE, is_undetermined, undetermined


def alignment_matrix(runs: pd.DataFrame, fm_sites: Mapping[str, str], metric: str = "auroc"):
    """Mean ``metric`` per FM (rows) x data site (columns), over tasks and seeds."""
    missing = [c for c in ("fm", "task_site", metric) if c not in runs.columns]
    if missing:
        raise ValueError(f"alignment: runs table lacks column(s) {missing}")
    table = runs.pivot_table(index="fm", columns="task_site", values=metric, aggfunc="mean")
    sites = list(dict.fromkeys(fm_sites[fm] for fm in table.index if fm in fm_sites))
    ordered = [s for s in sites if s in table.columns] + [
        s for s in table.columns if s not in sites
    ]
    # FM rows in the order of their sites' columns, so aligned cells run down the diagonal
    rank = {s: i for i, s in enumerate(ordered)}
    rows = sorted(table.index, key=lambda fm: (rank.get(fm_sites.get(fm, ""), len(rank)), fm))
    return table.loc[rows, ordered].rename_axis(index="fm", columns="task_site")


def _task_verdict(rows: pd.DataFrame, aligned: set[str]) -> tuple[str, float, float]:
    """Verdict of one task from its aligned-vs-other comparisons (diff signed aligned - other)."""
    outcomes, diffs, p_adj = [], [], []
    for r in rows.itertuples():
        a_is_aligned = r.fm_a in aligned
        diff = r.diff if a_is_aligned else -r.diff
        diffs.append(diff)
        p_adj.append(r.p_adj)
        if is_undetermined(r.verdict):
            outcomes.append(r.verdict)
        elif r.verdict.endswith(BETTER):
            winner = r.verdict[: -len(BETTER)].strip()
            outcomes.append(BETTER if winner in aligned else WORSE)
        else:
            outcomes.append(NO_EVIDENCE)
    if WORSE in outcomes:
        verdict = WORSE
    elif any(is_undetermined(o) for o in outcomes):
        verdict = next(o for o in outcomes if is_undetermined(o))
    elif outcomes and all(o == BETTER for o in outcomes):
        verdict = BETTER
    else:
        verdict = NO_EVIDENCE
    return verdict, min(diffs, default=float("nan")), max(p_adj, default=float("nan"))


def alignment_verdicts(
    comparisons: pd.DataFrame, fm_sites: Mapping[str, str], task_sites: Mapping[str, str]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-task alignment verdicts and the headline.

    ``comparisons`` is :func:`~retfm.evaluation.comparison.compare_fms`'s table. Returns a frame
    (task, task_site, aligned_fms, verdict, min_diff, max_p_adj) and the headline dict:
    n_tasks, n_decided, n_better, n_worse, n_no_evidence, n_undetermined, fraction (better /
    decided, None when nothing was decided), better_tasks, undetermined_tasks (task -> reason),
    tasks_without_aligned_fm.
    """
    rows, without = [], []
    for task, site in task_sites.items():
        aligned = {fm for fm, s in fm_sites.items() if s == site}
        if not aligned:
            without.append(task)
            continue
        mine = comparisons[comparisons["task"] == task] if len(comparisons) else comparisons
        if len(mine):
            mine = mine[mine["fm_a"].isin(aligned) != mine["fm_b"].isin(aligned)]
        if not len(mine):
            verdict, diff, p = (
                undetermined("no other FM to compare with"),
                float("nan"),
                float("nan"),
            )
        else:
            verdict, diff, p = _task_verdict(mine, aligned)
        rows.append(
            {
                "task": task,
                "task_site": site,
                "aligned_fms": ",".join(sorted(aligned)),
                "verdict": verdict,
                "min_diff": diff,
                "max_p_adj": p,
            }
        )
    per_task = pd.DataFrame(
        rows, columns=["task", "task_site", "aligned_fms", "verdict", "min_diff", "max_p_adj"]
    )
    counts = per_task["verdict"].map(lambda v: "undetermined" if is_undetermined(v) else v)
    n_decided = int((counts != "undetermined").sum())
    n_better = int((counts == BETTER).sum())
    headline = {
        "n_tasks": len(per_task),
        "n_decided": n_decided,
        "n_better": n_better,
        "n_worse": int((counts == WORSE).sum()),
        "n_no_evidence": int((counts == NO_EVIDENCE).sum()),
        "n_undetermined": int((counts == "undetermined").sum()),
        "fraction": n_better / n_decided if n_decided else None,
        "better_tasks": per_task.loc[counts == BETTER, "task"].tolist(),
        "undetermined_tasks": dict(
            zip(
                per_task.loc[counts == "undetermined", "task"],
                per_task.loc[counts == "undetermined", "verdict"],
                strict=True,
            )
        ),
        "tasks_without_aligned_fm": without,
    }
    return per_task, headline
