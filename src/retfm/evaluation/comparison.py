"""The study's comparison of FMs: per-task tests, alignment, metadata factors, registry tags.

Inputs are the evaluate stage's per-run table (one row per FM x task x seed) and the test
predictions of every run. Per task the two FMs are compared twice, as RETFound did and as a
paired per-image test: a Welch t-test over seeds, and DeLong's paired test (binary) or a
patient-clustered paired bootstrap (multi-class) on the seed-averaged probabilities of the same
test images. p-values are adjusted over tasks (Holm; Benjamini-Hochberg shown beside it).
"""

from __future__ import annotations

import hashlib
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from retfm.evaluation.alignment import aligned_comparisons, alignment_matrix, alignment_summary
from retfm.evaluation.factors import factor_effects
from retfm.evaluation.statistics import adjust_pvalues, delong_test, paired_bootstrap, seed_ttest
from retfm.evaluation.subgroups import add_groups, prob_columns
from retfm.settings import Settings


def seed_average(preds: pd.DataFrame) -> pd.DataFrame:
    """One row per test image with the probabilities averaged over seeds (an ensemble)."""
    probs = prob_columns(preds)
    keys = [c for c in preds.columns if c not in (*probs, "seed", "run_id")]
    return preds.groupby(keys, dropna=False, sort=True)[probs].mean().reset_index()


def compare_task(
    task: str, runs: pd.DataFrame, preds: dict[str, pd.DataFrame], *, n_boot: int, seed: int
) -> list[dict[str, Any]]:
    """Every pair of FMs on one task: seed t-test and paired per-image test."""
    rows = []
    for fm_a, fm_b in combinations(sorted(preds), 2):
        a, b = preds[fm_a], preds[fm_b]
        merged = a.merge(b, on="image_id", suffixes=("_a", "_b"))
        if len(merged) != len(a):
            raise ValueError(f"task {task}: FMs {fm_a} and {fm_b} were tested on different images")
        probs = prob_columns(a)
        pa = merged[[f"{c}_a" for c in probs]].to_numpy(float)
        pb = merged[[f"{c}_b" for c in probs]].to_numpy(float)
        y = merged["y_true_a"].to_numpy(int)
        if len(probs) == 2:
            paired = delong_test(y, pa, pb)
            test = "DeLong (paired)"
        else:
            paired = paired_bootstrap(
                y,
                pa,
                pb,
                n_boot=max(n_boot, 200),
                seed=seed,
                cluster=merged["patient_id_a"].to_numpy(),
            )
            test = "paired bootstrap (patients)"
        tt = seed_ttest(
            runs.loc[runs["fm"] == fm_a, "auroc"], runs.loc[runs["fm"] == fm_b, "auroc"]
        )
        rows.append(
            {
                "task": task,
                "fm_a": fm_a,
                "fm_b": fm_b,
                "auroc_a": float(runs.loc[runs["fm"] == fm_a, "auroc"].mean()),
                "auroc_b": float(runs.loc[runs["fm"] == fm_b, "auroc"].mean()),
                "ensemble_diff": float(paired["diff"]),
                "paired_test": test,
                "p_paired": float(paired["p"]),
                "p_seeds": float(tt["p"]),
            }
        )
    return rows


def significance_table(rows: list[dict[str, Any]], alpha: float) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for col in ("p_paired", "p_seeds"):
        table[f"{col}_holm"] = adjust_pvalues(table[col].to_numpy(), "holm")
        table[f"{col}_bh"] = adjust_pvalues(table[col].to_numpy(), "bh")
    table["significant"] = (table["p_paired_holm"] < alpha).fillna(False)
    table["better"] = np.where(table["auroc_a"] >= table["auroc_b"], table["fm_a"], table["fm_b"])
    return table


def pooled_factor_effects(
    preds: dict[tuple[str, str], pd.DataFrame], settings: Settings, factors: list[str]
) -> pd.DataFrame:
    """Factor analysis over all tasks at once (images keep their task in the id)."""
    by_fm: dict[str, list[pd.DataFrame]] = {}
    for (fm, task), frame in preds.items():
        frame = frame.assign(
            image_id=task + "/" + frame["image_id"].astype(str),
            patient_id=task + "/" + frame["patient_id"].astype(str),
        )
        binary = _to_binary(frame)
        by_fm.setdefault(fm, []).append(binary)
    age_bins = settings.evaluation.age_bins if "age" in settings.evaluation.factors else {}
    stacked = {
        fm: add_groups(pd.concat(frames, ignore_index=True), age_bins)
        for fm, frames in by_fm.items()
    }
    usable = [f for f in factors if all(f"group.{f}" in s.columns for s in stacked.values())]
    return factor_effects(
        stacked,
        usable,
        alpha=settings.compare.alpha,
        min_group_size=settings.evaluation.min_group_size,
    )


def _to_binary(frame: pd.DataFrame) -> pd.DataFrame:
    """Disease (label > 0) vs none, so that tasks with different class counts can be pooled."""
    probs = prob_columns(frame)
    if len(probs) == 2:
        return frame
    out = frame.drop(columns=probs)
    out["prob_0"] = frame["prob_0"]
    out["prob_1"] = 1.0 - frame["prob_0"]
    out["y_true"] = (frame["y_true"] > 0).astype(int)
    return out


def alignment(runs: pd.DataFrame, alpha: float, tasks: list[str]) -> dict[str, Any]:
    results = runs.rename(columns={"fm": "fm_site"})
    matrix = alignment_matrix(results)
    summary = alignment_summary(aligned_comparisons(results), alpha=alpha, tasks=tasks)
    return {"matrix": matrix, **summary}


def fm_evaluation_tags(
    runs: pd.DataFrame, factors: list[str], eval_data: str, metric: str = "auroc"
) -> dict[str, dict[str, str]]:
    """``eval.*`` tags per FM, read by the promotion gates (see registry/promotion.py)."""
    tags: dict[str, dict[str, str]] = {}
    for fm, frame in runs.groupby("fm"):
        per_task = frame.groupby("task").mean(numeric_only=True)
        t = {
            "eval.data": eval_data,
            f"eval.{metric}": f"{per_task[metric].mean():.5f}",
            "eval.tasks": ",".join(sorted(per_task.index)),
        }
        for factor in factors:
            worst, gap = f"worst/{metric}/{factor}", f"gap/{metric}/{factor}"
            undefined = f"n_undefined/{factor}"
            if worst in per_task and per_task[worst].notna().any():
                t[f"eval.worst.{metric}.{factor}"] = f"{per_task[worst].min():.5f}"
            if gap in per_task and per_task[gap].notna().any():
                t[f"eval.gap.{metric}.{factor}"] = f"{per_task[gap].max():.5f}"
            n_undef = frame[undefined].max() if undefined in frame else 0
            t[f"eval.undefined.{factor}"] = str(int(0 if pd.isna(n_undef) else n_undef))
        tags[str(fm)] = t
    return tags


def evaluation_data_hash(fingerprints: dict[str, str]) -> str:
    blob = "|".join(f"{k}={v}" for k, v in sorted(fingerprints.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
