"""Which metadata factors matter? (STUDY.md finding 2: age does, sex and ethnicity do not.)

Per test image and FM the outcome is its *placement value*: the share of the task's images of
other classes that score lower on the image's true class. Its mean over a class is that class's
one-vs-rest AUROC, so a group's mean placement is the group's cross-group AUROC (xAUC): the
AUROC fairness analyses report, per image, without a threshold. For each factor (age bands, sex,
ethnicity, ...) two questions, asked over every task and FM at once:

* **does the factor change performance?** Do placements differ between groups *within the
  same task, true class and FM*?
* **does it change the gap between FMs?** Does the difference between two FMs' placements of
  the same image differ between groups, within the same task and true class?

Both are answered by a stratified score test with a patient-clustered variance (a generalised
Cochran-Mantel-Haenszel test): with strata s (task x class x FM, or task x class x FM pair),
outcome y and group indicators Z, centre y and Z within strata, U = sum_i Z~_i y~_i,
V = K/(K-1) sum_patients u_p u_p' with u_p the patient's sum of Z~ y~, and
U' V^-1 U ~ chi2(groups - 1). Nothing is fitted, so nothing can fail to converge. p-values are
adjusted across every factor and both questions together (Holm by default): "which factors
matter" is one question. Under the null a placement's dependence on the other class's images
cancels to first order, so the patient-clustered variance is the right one.

Why this design: tasks differ in difficulty and in their age / sex / ethnicity mix, and inside
a task the groups differ in disease prevalence (older patients are sicker) while performance
differs by class. A model without task-by-class strata reads those differences as factor
effects (in simulation with no effect inside any task: ethnicity flagged in 92% of studies, age
in 43-100%). Why a score test: a patient-clustered Wald test of a fitted logit was too liberal
for small groups (raw false-positive rate 13-15% at alpha 5% for 4 age bands and 7
ethnicities at 120 test images per task); the score test held 2-6%. Why placements rather than
right/wrong calls: the same test on arg-max correctness found a 0.04 AUROC age gap in 15% of
simulated studies, placements in about three times as many (``retfm calibrate``).

Effect sizes: each group's within-stratum placement difference against the factor's largest
group (``auroc_diff``, on the AUROC scale, with a patient-clustered 95% interval, unadjusted),
and, as a description, the mean within-task AUROC gap (max - min over groups with both classes,
averaged over FM x task).

Verdicts: ``effect`` (adjusted p < alpha), ``no evidence``, or ``undetermined (reason)``:
fewer than two groups large enough, or no variation left (identical FMs, a single class). An
undetermined factor is never reported as "no effect".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

from retfm.evaluation.statistics import adjust_pvalues, auroc_influence
from retfm.evaluation.subgroups import (
    check_predictions,
    group_sort_key,
    groups_of,
    is_unknown,
    prob_columns,
)
from retfm.evaluation.verdicts import EFFECT, NO_EVIDENCE, undetermined

Key = tuple[str, str]  # (fm, task)
TEST_NAME = (
    "stratified score test of per-image placement (cross-group AUROC) within task x class x "
    "FM, patient-clustered variance; adjusted over every factor and both questions"
)


def placement(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each image's own-class placement value: the share of the task's images of *other*
    classes that score lower on the image's true class (ties half), NaN when its class is the
    only one. Its mean over a class's images is that class's one-vs-rest AUROC, so a group's
    mean placement is its cross-group AUROC (xAUC, Kallus & Zhou 2019)."""
    out = np.full(len(y), np.nan)
    for c in np.unique(y):
        own = y == c
        if own.all():
            continue
        s = probs[:, c] if probs.shape[1] > 2 else (probs[:, 1] if c == 1 else probs[:, 0])
        ranks = stats.rankdata(np.concatenate([s[own], s[~own]]))[: own.sum()]
        out[own] = (ranks - stats.rankdata(s[own])) / (~own).sum()
    return out


def _images(preds: Mapping[Key, pd.DataFrame], factor: str, cluster: str) -> pd.DataFrame:
    """One row per (task, image) with each FM's placement value as a column ``fm:<name>``."""
    by_task: dict[str, pd.DataFrame] = {}
    for (fm, task), frame in preds.items():
        y, probs = frame["y_true"].to_numpy().astype(int), frame[prob_columns(frame)].to_numpy()
        part = pd.DataFrame(
            {"image_id": frame["image_id"].astype(str).to_numpy(), f"fm:{fm}": placement(y, probs)}
        )
        if task not in by_task:
            part["task"] = task
            part["cls"] = y
            part["grp"] = groups_of(frame, factor).to_numpy()
            part["cluster"] = task + "/" + frame[cluster].astype(str).to_numpy()
            by_task[task] = part
        else:
            merged = by_task[task].merge(part, on="image_id", how="outer", indicator=True)
            if (merged["_merge"] != "both").any():
                raise ValueError(f"task {task!r}: FM {fm!r} was tested on other images")
            by_task[task] = merged.drop(columns="_merge")
    images = pd.concat(by_task.values(), ignore_index=True)
    return images[images.filter(like="fm:").notna().all(axis=1)].reset_index(drop=True)


def _keep_groups(images: pd.DataFrame, min_group_size: int) -> tuple[list[str], list[str]]:
    sizes = images.groupby("grp").size()
    keep = [str(g) for g, n in sizes.items() if n >= min_group_size and not is_unknown(str(g))]
    keep.sort(key=lambda g: (-sizes[g], group_sort_key(g)))  # largest group first: the reference
    return keep, sorted(set(map(str, sizes.index)) - set(keep), key=group_sort_key)


def _long(images: pd.DataFrame, fms: list[str], question: str) -> pd.DataFrame:
    """Rows of (y, stratum, grp, cluster): per image x FM for "perf", per image x FM pair
    (each FM against the first) for "gap"."""
    base = images["task"] + "|" + images["cls"].astype(str) + "|"
    if question == "perf":
        parts = [images.assign(y=images[f"fm:{fm}"], stratum=base + fm) for fm in fms]
    else:
        first = images[f"fm:{fms[0]}"]
        parts = [
            images.assign(y=images[f"fm:{fm}"] - first, stratum=base + fm, pair=fm)
            for fm in fms[1:]
        ]
    return pd.concat(parts, ignore_index=True)


@dataclass(frozen=True)
class _Score:
    stat: float = float("nan")
    df: int = 0
    p: float = float("nan")
    undetermined: str = ""
    effects: pd.DataFrame | None = None  # per tested column: estimate, lo, hi


def _centre(values: np.ndarray, strata: np.ndarray, counts: np.ndarray) -> np.ndarray:
    if values.ndim == 1:
        return values - (np.bincount(strata, values) / counts)[strata]
    means = np.stack([np.bincount(strata, v) / counts for v in values.T], axis=1)
    return values - means[strata]


def _score_test(rows: pd.DataFrame, columns: dict[str, np.ndarray]) -> _Score:
    """Stratified score test that the ``columns`` (indicator arrays) do not move ``y``."""
    strata = pd.factorize(rows["stratum"])[0]
    counts = np.bincount(strata).astype(float)
    z = _centre(np.stack(list(columns.values()), axis=1), strata, counts)
    keep = np.abs(z).sum(axis=0) > 1e-12  # a column constant within every stratum says nothing
    names = [n for n, k in zip(columns, keep, strict=True) if k]
    if not names:
        return _Score(undetermined="the groups never share a task and class")
    z = z[:, keep]
    r = _centre(rows["y"].to_numpy(float), strata, counts)
    clusters = pd.factorize(rows["cluster"])[0]
    n_clusters = int(clusters.max()) + 1
    per_cluster = np.zeros((n_clusters, z.shape[1]))
    np.add.at(per_cluster, clusters, z * r[:, None])
    u = per_cluster.sum(axis=0)
    v = per_cluster.T @ per_cluster * n_clusters / max(n_clusters - 1, 1)
    if not np.any(r) or np.linalg.matrix_rank(v) < len(names):
        why = "no variation left within task and class (the FMs rank every image the same)"
        return _Score(undetermined=why)
    stat = float(u @ np.linalg.solve(v, u))
    effects = _effects(z, rows["y"].to_numpy(float), strata, counts, clusters, names)
    return _Score(stat, len(names), float(stats.chi2.sf(stat, len(names))), "", effects)


def _effects(z, y, strata, counts, clusters, names) -> pd.DataFrame:  # noqa: ANN001
    """Within-stratum least-squares effect of each column, patient-clustered 95% interval."""
    yc = _centre(y, strata, counts)
    bread = np.linalg.pinv(z.T @ z)
    beta = bread @ z.T @ yc
    resid = yc - z @ beta
    meat_rows = np.zeros((int(clusters.max()) + 1, z.shape[1]))
    np.add.at(meat_rows, clusters, z * resid[:, None])
    k = len(meat_rows)
    cov = bread @ (meat_rows.T @ meat_rows) @ bread * k / max(k - 1, 1)
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    return pd.DataFrame(
        {"estimate": beta, "lo": beta - 1.96 * se, "hi": beta + 1.96 * se}, index=names
    )


def _indicators(rows: pd.DataFrame, groups: list[str], question: str) -> dict[str, np.ndarray]:
    grp = rows["grp"].to_numpy()
    if question == "perf":
        return {g: (grp == g).astype(float) for g in groups[1:]}
    pair = rows["pair"].to_numpy()
    return {
        f"{g} x {fm}": ((grp == g) & (pair == fm)).astype(float)
        for fm in dict.fromkeys(pair)
        for g in groups[1:]
    }


def _within_task_auroc_gap(
    preds: Mapping[Key, pd.DataFrame], factor: str, groups: list[str], min_group_size: int
) -> float:
    """Mean over FM x task of the AUROC range across groups with both classes and enough images."""
    gaps = []
    for frame in preds.values():
        y, probs = frame["y_true"].to_numpy().astype(int), frame[prob_columns(frame)].to_numpy()
        labels = groups_of(frame, factor).to_numpy()
        values = []
        for g in groups:
            mask = labels == g
            if mask.sum() >= min_group_size and len(np.unique(y[mask])) > 1:
                values.append(auroc_influence(y[mask], probs[mask])[0])  # fast rank AUROC
        if len(values) > 1:
            gaps.append(float(np.ptp(values)))
    return float(np.mean(gaps)) if gaps else float("nan")


def _effect_rows(factor: str, groups: list[str], images: pd.DataFrame, perf: _Score):
    sizes = images.groupby("grp").size()
    rows = []
    for g in groups:
        row = {
            "factor": factor,
            "group": g,
            "n_images": int(sizes.get(g, 0)),
            "reference": g == groups[0],
        }
        if g == groups[0]:
            row.update(auroc_diff=0.0, lo=np.nan, hi=np.nan)
        elif perf.effects is not None and g in perf.effects.index:
            row.update(
                auroc_diff=float(perf.effects.loc[g, "estimate"]),
                lo=float(perf.effects.loc[g, "lo"]),
                hi=float(perf.effects.loc[g, "hi"]),
            )
        else:
            row.update(auroc_diff=np.nan, lo=np.nan, hi=np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def factor_effects(
    preds: Mapping[Key, pd.DataFrame],
    factors: Sequence[str],
    *,
    alpha: float = 0.05,
    correction: Literal["holm", "bh"] = "holm",
    min_group_size: int = 10,
    cluster: str = "patient_id",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test each factor; returns (one row per factor, one row per factor x group).

    ``preds`` maps (fm, task) to one prediction per test image (seed-averaged), with the
    ``group.<factor>`` columns of :func:`~retfm.evaluation.subgroups.add_groups`; every FM of a
    task must score the same images. Per-factor columns: groups (reference first), left_out,
    n_images, auroc_gap, perf_stat/df/p/p_adj/verdict/flagged and the same for gap (the gap
    question needs two FMs). Per-group columns: n_images, auroc_diff (mean placement vs the
    reference, within task x class x FM), lo, hi.
    """
    if not preds:
        raise ValueError("factor_effects: no predictions given")
    for (fm, task), frame in preds.items():
        try:
            check_predictions(frame)
        except ValueError as err:
            raise ValueError(f"FM {fm!r}, task {task!r}: {err}") from None
    fms = sorted({fm for fm, _ in preds})
    rows, effects = [], []
    for factor in factors:
        images = _images(preds, factor, cluster)
        groups, left_out = _keep_groups(images, min_group_size)
        images = images[images["grp"].isin(groups)]
        row: dict = {
            "factor": factor,
            "groups": groups,
            "left_out": left_out,
            "n_images": len(images),
        }
        if len(groups) < 2:
            perf = gap = _Score(
                undetermined=f"fewer than two groups with at least {min_group_size} images"
            )
        else:
            long = _long(images, fms, "perf")
            perf = _score_test(long, _indicators(long, groups, "perf"))
            if len(fms) > 1:
                long = _long(images, fms, "gap")
                gap = _score_test(long, _indicators(long, groups, "gap"))
            else:
                gap = _Score(undetermined="one FM: no gap between FMs")
            effects.append(_effect_rows(factor, groups, images, perf))
        for name, res in (("perf", perf), ("gap", gap)):
            row.update(
                {
                    f"{name}_stat": res.stat,
                    f"{name}_df": res.df,
                    f"{name}_p": res.p,
                    f"{name}_undetermined": res.undetermined,
                }
            )
        row["auroc_gap"] = _within_task_auroc_gap(preds, factor, groups, min_group_size)
        rows.append(row)
    out = pd.DataFrame(rows)
    # One family for both questions and every factor: "which factors matter" is one question,
    # so a study with no effect anywhere flags nothing with probability >= 1 - alpha.
    adjusted = adjust_pvalues(np.concatenate([out["perf_p"], out["gap_p"]]), correction)
    out["perf_p_adj"], out["gap_p_adj"] = adjusted[: len(out)], adjusted[len(out) :]
    for q in ("perf", "gap"):
        out[f"{q}_verdict"] = [
            undetermined(why) if why else (EFFECT if p < alpha else NO_EVIDENCE)
            for p, why in zip(out[f"{q}_p_adj"], out[f"{q}_undetermined"], strict=True)
        ]
        out[f"{q}_flagged"] = out[f"{q}_verdict"] == EFFECT
    columns = ["factor", "group", "n_images", "reference", "auroc_diff", "lo", "hi"]
    table = pd.concat(effects, ignore_index=True) if effects else pd.DataFrame(columns=columns)
    return out, table
