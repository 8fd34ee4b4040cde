"""What the study's evaluation says about each promotable model, as registry tags and text.

The compare stage writes these on every FM version (all its adaptation runs) and every
classifier version (the runs of the seed that was registered), so that promotion gates, the
version's description and its evaluation card all read one record:

- ``eval/auroc``: the mean AUROC (over tasks, of the seed means);
- per factor ``eval/worst/auroc/<f>`` (lowest defined group, over tasks) and
  ``eval/gap/auroc/<f>`` (largest within-task gap between defined groups);
- per factor ``eval/n_undefined/<f>`` (number of (task, group) pairs without a defined AUROC),
  ``eval/n_undefined_small/<f>`` (how many of them are only under ``min_group_size``) and
  ``eval.undefined_groups.<f>`` (which, and why: "screening_dr: black (4 images)");

A quantity is spelled as its MLflow metric is (``gap/auroc/age``), in ``dvc metrics`` too, with
``eval/`` in front on the registry. Tags that are not quantities keep a dotted name.
- ``eval.data`` (a hash of the test sets), ``eval.tasks``, ``eval.promotion_settings`` (a hash
  of the ``promotion`` settings the study was made with: promotion checks it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import pandas as pd

MAX_TAG = 4000  # characters of a tag value kept (MLflow stores up to 8000)


def settings_digest(section: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()[:16]


def _undefined(groups: pd.DataFrame, factor: str, min_group_size: int) -> pd.DataFrame:
    mine = groups[(groups["factor"] == factor) & ~groups["defined"].astype(bool)]
    if not len(mine):
        return mine
    mine = mine.assign(small=mine["n"].astype(int) < min_group_size)
    return mine.drop_duplicates(["task", "group"]).sort_values(["task", "group"])


def _names(undefined: pd.DataFrame) -> str:
    parts = []
    for task, frame in undefined.groupby("task", sort=True):
        items = [
            f"{r.group} ({int(r.n)} images" + (")" if r.small else f": {r.reason})")
            for r in frame.itertuples()
        ]
        parts.append(f"{task}: {', '.join(items)}")
    return "; ".join(parts)[:MAX_TAG]


def evaluation_tags(
    runs: pd.DataFrame,
    groups: pd.DataFrame,
    factors: Iterable[str],
    *,
    eval_data: str,
    promotion_settings: str,
    min_group_size: int,
    metric: str = "auroc",
) -> dict[str, str]:
    """The ``eval.*`` tags of one model from its runs (rows of runs.parquet) and their groups
    (rows of groups.parquet with the same run keys)."""
    per_task = runs.groupby("task").mean(numeric_only=True)
    tags = {
        "eval.data": eval_data,
        "eval.promotion_settings": promotion_settings,
        f"eval/{metric}": f"{per_task[metric].mean():.5f}",
        "eval.tasks": ",".join(sorted(per_task.index)),
    }
    for factor in factors:
        worst, gap = f"worst/{metric}/{factor}", f"gap/{metric}/{factor}"
        if worst in per_task and per_task[worst].notna().any():
            tags[f"eval/{worst}"] = f"{per_task[worst].min():.5f}"
        if gap in per_task and per_task[gap].notna().any():
            tags[f"eval/{gap}"] = f"{per_task[gap].max():.5f}"
        undefined = _undefined(groups, factor, min_group_size)
        tags[f"eval/n_undefined/{factor}"] = str(len(undefined))
        small = int(undefined["small"].sum()) if len(undefined) else 0
        tags[f"eval/n_undefined_small/{factor}"] = str(small)
        tags[f"eval.undefined_groups.{factor}"] = _names(undefined) or "none"
    return tags


def description(name: str, runs: pd.DataFrame, tags: dict[str, str], factors: Iterable[str],
                metric: str = "auroc") -> str:  # fmt: skip
    """The evaluation summary a registry version shows (Markdown): per task the AUROC (mean
    +- sd over the runs), then per factor the worst group, the gap and undefined groups."""
    lines = [
        f"**Evaluation** (study run `{tags.get('eval.study_run', '?')}`, test data "
        f"`{tags.get('eval.data')}`)",
        "",
        "| task | AUROC | runs |",
        "|---|---|---|",
    ]
    for task, frame in runs.groupby("task", sort=True):
        sd = frame[metric].std(ddof=1) if len(frame) > 1 else 0.0
        lines.append(f"| {task} | {frame[metric].mean():.3f} ± {sd:.3f} | {len(frame)} |")
    lines += ["", "| factor | worst group AUROC | largest gap | undefined groups |",
              "|---|---|---|---|"]  # fmt: skip
    for f in factors:
        lines.append(
            f"| {f} | {tags.get(f'eval/worst/{metric}/{f}', '-')} | "
            f"{tags.get(f'eval/gap/{metric}/{f}', '-')} | "
            f"{tags.get(f'eval.undefined_groups.{f}', 'none')} |"
        )
    return "\n".join(lines)
