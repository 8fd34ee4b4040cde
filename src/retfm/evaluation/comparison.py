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
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from typing import Literal

import numpy as np
import pandas as pd

from retfm.evaluation.statistics import (
    ReplicateFit,
    adjust_pvalues,
    detectable_difference,
    pooled_replicate_test,
    replicate_fit,
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
DATA_LEVEL_TEST = (
    "data-level test over pre-training runs: difference of the mean over each site's "
    "replicates of their seed-mean AUROCs, variance = spread between replicates (cohort draw, "
    "pre-training, seeds) / K per site + the test-set error the replicates share "
    "(patient-clustered), Satterthwaite t"
)
#: What the per-run test does not cover: it compares two pre-training runs as trained. Each is
#: one run on one drawn cohort; another draw moves the difference by about as much as the
#: test's own error (benchmarks/bench_recovery.py --draws). The data-level test covers it.
COMPARISON_SCOPE = (
    "a per-run comparison compares two pre-training runs as trained (one drawn cohort each); "
    "the spread between such draws is not in it, so it says which run is better. Whether a "
    "site's data is better is the data-level verdict, which pools each site's replicated "
    "pre-training runs and has the spread between draws in its variance"
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
    if "seed" not in preds:
        first = preds.sort_values("image_id").reset_index(drop=True)
        return first.drop(columns=[c for c in (*probs, "run_id") if c in first]), [
            first[probs].to_numpy(float)
        ]
    ordered = preds.sort_values(["seed", "image_id"], kind="stable")
    seeds, counts = np.unique(ordered["seed"].to_numpy(), return_counts=True)
    n = int(counts[0])
    ids = ordered["image_id"].to_numpy()
    for i, s in enumerate(seeds):
        if counts[i] != n or not np.array_equal(ids[i * n : (i + 1) * n], ids[:n]):
            raise ValueError(f"{where}: seed {s} scored other test images than seed {seeds[0]}")
    values = ordered[probs].to_numpy(float).reshape(len(seeds), n, len(probs))
    first = ordered.iloc[:n].reset_index(drop=True)
    return first.drop(columns=[c for c in (*probs, "seed", "run_id") if c in first]), list(values)


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
    pairs: Callable[[str, str], bool] | None = None,
) -> pd.DataFrame:
    """Every pair of FMs on every task, decided by the paired seeded test.

    ``preds`` maps (fm, task) to per-seed predictions (``seed`` column). ``same_recipe`` (FM ->
    recipe) restricts pairs to FMs of one recipe; ``pairs`` (two names -> bool) further to
    the pairs it accepts. Columns: task, fm_a, fm_b, auroc_a, auroc_b,
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
            if pairs is not None and not pairs(fm_a, fm_b):
                continue
            rows.append(_pair_row(task, fm_a, fm_b, preds[(fm_a, task)], preds[(fm_b, task)], ci))
    return _decide(pd.DataFrame(rows), alpha, correction, power)


def _decide(table: pd.DataFrame, alpha: float, correction: str, power: float) -> pd.DataFrame:
    """Adjusted p over the table (one family), verdicts and the detectable difference."""
    if table.empty:
        return table
    table["p_adj"] = adjust_pvalues(table["p"].to_numpy(), correction)  # type: ignore[arg-type]
    family = int(np.isfinite(table["p"]).sum())
    table["verdict"] = [_verdict(r, alpha) for r in table.itertuples()]
    table["detectable"] = [
        detectable_difference(se, df, alpha / max(family, 1), power)
        for se, df in zip(table["se"], table["df"], strict=True)
    ]
    return table


def replicate_fits(
    preds: Mapping[Key, pd.DataFrame], task: str, runs: Sequence[str]
) -> tuple[pd.DataFrame, dict[str, ReplicateFit]]:
    """The test images of ``task`` and each run's :class:`ReplicateFit` on them (patients
    coded once, so that the runs' influences line up)."""
    images = None
    fits: dict[str, ReplicateFit] = {}
    codes = np.zeros(0, int)
    n_patients = 0
    for run in runs:
        mine, probs = seed_arrays(preds[(run, task)], f"run {run}, task {task}")
        if images is None:
            images = mine
            codes, uniques = pd.factorize(mine["patient_id"].astype(str))
            n_patients = len(uniques)
        elif not mine["image_id"].equals(images["image_id"]):
            raise ValueError(f"task {task}: run {run} was tested on other images than {runs[0]}")
        fits[run] = replicate_fit(mine["y_true"].to_numpy(int), probs, codes, n_patients)
    assert images is not None
    return images, fits


def compare_sites(
    preds: Mapping[Key, pd.DataFrame],
    replicate_of: Mapping[str, str],
    *,
    alpha: float = 0.05,
    correction: Literal["holm", "bh"] = "holm",
    ci: float = 0.95,
    power: float = 0.8,
    same_recipe: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """The data-level comparisons: every pair of FMs (FM = site x recipe) on every task, each
    FM's pre-training runs pooled (:func:`~retfm.evaluation.statistics.pooled_replicate_test`),
    p adjusted over this family.

    ``preds`` maps (run, task) to per-seed predictions; ``replicate_of`` run -> FM;
    ``same_recipe`` FM -> recipe. Columns as :func:`compare_fms` (fm_a / fm_b are FMs) plus the
    replicate parts: var_replicates, var_test, sd_replicates_a/b, n_replicates_a/b and the
    replicates' AUROCs.
    """
    tasks = list(dict.fromkeys(task for _, task in preds))
    rows = []
    for task in tasks:
        runs = sorted(r for r, t in preds if t == task)
        by_fm: dict[str, list[str]] = {}
        for run in runs:
            by_fm.setdefault(replicate_of.get(run, run), []).append(run)
        images, fits = replicate_fits(preds, task, runs)
        for fm_a, fm_b in combinations(sorted(by_fm), 2):
            if same_recipe and same_recipe.get(fm_a) != same_recipe.get(fm_b):
                continue
            res = pooled_replicate_test(
                [fits[r] for r in by_fm[fm_a]],
                [fits[r] for r in by_fm[fm_b]],
                n_images=len(images),
                ci=ci,
            )
            rows.append({"task": task, "fm_a": fm_a, "fm_b": fm_b, **res.as_dict()})
    return _decide(pd.DataFrame(rows), alpha, correction, power)


def _verdict(row, alpha: float) -> str:  # noqa: ANN001 - a DataFrame row tuple
    if row.undetermined:
        return undetermined(row.undetermined)
    if row.p_adj < alpha:
        return f"{row.fm_a if row.diff > 0 else row.fm_b} {BETTER}"
    return NO_EVIDENCE


def evaluation_data_hash(fingerprints: dict[str, str]) -> str:
    blob = "|".join(f"{k}={v}" for k, v in sorted(fingerprints.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
