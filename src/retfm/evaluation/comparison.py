"""Which FM is better on which task: every pair of FMs compared on the same test images.

The deciding test is :func:`~retfm.evaluation.statistics.seeded_paired_test`: the difference of
the seed-mean AUROCs, with a variance that holds both the test set's sampling error (clustered
by patient) and the training seeds' spread. p-values are adjusted over every comparison of the
study (Holm by default); a comparison is decided as ``<fm> better``, ``no evidence`` or
``undetermined (reason)``. RETFound's Welch t-test over seeds is kept as an extra, labelled
column (``p_seed_ttest``): it ignores the test set's error and decides nothing here.

Also here: the per-image seed average used by the factor analysis, and the hash of the test
sets the ``eval.*`` tags record (:mod:`retfm.registry.evaluation`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from itertools import combinations
from typing import Literal

import numpy as np
import pandas as pd

from retfm.evaluation.statistics import (
    adjust_pvalues,
    detectable_difference,
    seed_ttest,
    seeded_paired_test,
)
from retfm.evaluation.subgroups import prob_columns
from retfm.evaluation.verdicts import BETTER, NO_EVIDENCE, undetermined

Key = tuple[str, str]  # (fm, task)
DECIDING_TEST = (
    "paired test on the same test images: difference of seed-mean AUROCs, variance = "
    "patient-clustered DeLong (test set) + seed variance, Satterthwaite t"
)
#: What the deciding test does not cover: it compares the FMs as trained. Each site's FM is one
#: pre-training run on one drawn cohort; another draw moves the difference by about as much as
#: the test's own error (benchmarks/bench_recovery.py --draws), and no single study can see it.
COMPARISON_SCOPE = (
    "it compares these FMs as trained: each site's FM is one pre-training run on one drawn "
    "cohort, and the spread between such draws (another cohort, another pre-training) is not "
    "in the test, so a difference says which of these FMs is better, and says that a site's "
    "data is better only when it holds over several pre-training runs per site"
)


def seed_average(preds: pd.DataFrame) -> pd.DataFrame:
    """One row per test image with the probabilities averaged over seeds (an ensemble)."""
    probs = prob_columns(preds)
    keys = [c for c in preds.columns if c not in (*probs, "seed", "run_id")]
    return preds.groupby(keys, dropna=False, sort=True)[probs].mean().reset_index()


def seed_arrays(preds: pd.DataFrame, where: str) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Split per-seed predictions into the test images (one row each, sorted by image_id) and
    one probability array per seed, rows aligned; every seed must score the same images."""
    probs = prob_columns(preds)
    seeds = sorted(preds["seed"].unique()) if "seed" in preds else [0]
    frames = {s: preds[preds["seed"] == s] if "seed" in preds else preds for s in seeds}
    first = frames[seeds[0]].sort_values("image_id").reset_index(drop=True)
    arrays = []
    for s, frame in frames.items():
        frame = frame.sort_values("image_id").reset_index(drop=True)
        if len(frame) != len(first) or not frame["image_id"].equals(first["image_id"]):
            raise ValueError(f"{where}: seed {s} scored other test images than seed {seeds[0]}")
        arrays.append(frame[probs].to_numpy(float))
    return first.drop(columns=[c for c in (*probs, "seed", "run_id") if c in first]), arrays


def _pair_row(task: str, fm_a: str, fm_b: str, a: pd.DataFrame, b: pd.DataFrame, ci: float):
    images_a, probs_a = seed_arrays(a, f"FM {fm_a}, task {task}")
    images_b, probs_b = seed_arrays(b, f"FM {fm_b}, task {task}")
    if not images_a["image_id"].equals(images_b["image_id"]):
        raise ValueError(f"task {task}: FMs {fm_a} and {fm_b} were tested on different images")
    res = seeded_paired_test(
        images_a["y_true"].to_numpy(int),
        probs_a,
        probs_b,
        images_a["patient_id"].astype(str).to_numpy(),
        ci=ci,
    )
    # the extra column only: seeds whose AUROC is undefined (a class missing) are left out
    seeds_a = [v for v in res.seed_aurocs_a if np.isfinite(v)]
    seeds_b = [v for v in res.seed_aurocs_b if np.isfinite(v)]
    tt = seed_ttest(seeds_a, seeds_b) if seeds_a and seeds_b else {"p": float("nan")}
    return {
        "task": task,
        "fm_a": fm_a,
        "fm_b": fm_b,
        **{k: v for k, v in res.as_dict().items() if not k.startswith("seed_aurocs")},
        "p_seed_ttest": float(tt["p"]),
    }


def compare_fms(
    preds: Mapping[Key, pd.DataFrame],
    *,
    alpha: float = 0.05,
    correction: Literal["holm", "bh"] = "holm",
    ci: float = 0.95,
    power: float = 0.8,
    same_recipe: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Every pair of FMs on every task, decided by the paired seeded test.

    ``preds`` maps (fm, task) to per-seed predictions (``seed`` column). ``same_recipe`` (FM ->
    recipe) restricts pairs to FMs of one recipe. Columns: task, fm_a, fm_b, auroc_a, auroc_b,
    diff (a - b), lo, hi, se, df, p, p_adj, verdict, detectable (the AUROC difference this
    comparison finds with probability ``power`` at the family's strictest level), the variance
    parts, sizes, and p_seed_ttest (extra; decides nothing).
    """
    tasks = list(dict.fromkeys(task for _, task in preds))
    rows = []
    for task in tasks:
        fms = sorted(fm for fm, t in preds if t == task)
        for fm_a, fm_b in combinations(fms, 2):
            if same_recipe and same_recipe.get(fm_a) != same_recipe.get(fm_b):
                continue
            rows.append(_pair_row(task, fm_a, fm_b, preds[(fm_a, task)], preds[(fm_b, task)], ci))
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["p_adj"] = adjust_pvalues(table["p"].to_numpy(), correction)
    family = int(np.isfinite(table["p"]).sum())
    table["verdict"] = [_verdict(r, alpha) for r in table.itertuples()]
    table["detectable"] = [
        detectable_difference(se, df, alpha / max(family, 1), power)
        for se, df in zip(table["se"], table["df"], strict=True)
    ]
    return table


def _verdict(row, alpha: float) -> str:  # noqa: ANN001 - a DataFrame row tuple
    if row.undetermined:
        return undetermined(row.undetermined)
    if row.p_adj < alpha:
        return f"{row.fm_a if row.diff > 0 else row.fm_b} {BETTER}"
    return NO_EVIDENCE


def evaluation_data_hash(fingerprints: dict[str, str]) -> str:
    blob = "|".join(f"{k}={v}" for k, v in sorted(fingerprints.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
