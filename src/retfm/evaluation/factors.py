"""Which metadata factors matter? (STUDY.md finding 2: age does, sex and ethnicity do not.)

For each factor two questions, each answered by a logistic model of per-image correctness
(arg-max class == label) on the stacked predictions of all FMs:

* does the factor change performance?  ``correct ~ C(y)*C(fm) + C(group)``, Wald test that all
  group terms are 0;
* does it change the gap between FMs?  ``... + C(group):C(fm)``, Wald test of the interaction.

Why these choices: the true class enters the model because groups differ in disease prevalence
(older patients are sicker) and accuracy differs by class, which would otherwise pass for a
group effect. The Wald tests use a patient-clustered covariance because one patient's images,
and the same image scored by two FMs, are not independent; a plain likelihood-ratio test would
count them as independent evidence and flag too often. Groups with missing metadata or fewer
than ``min_group_size`` images are left out (their names are reported). p-values are adjusted
across factors, separately for each question, and a factor is ``flagged`` when its adjusted p
is below ``alpha``.

Effect sizes: ``perf_effect`` is the range (max - min) of group accuracy over all FMs pooled,
``perf_auroc_gap`` the mean over FMs of the AUROC gap; ``gap_effect`` is the range over groups of
the accuracy difference between the first two FMs given.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import statsmodels.api as sm

from retfm.evaluation.bootstrap import MacroAuroc
from retfm.evaluation.statistics import adjust_pvalues
from retfm.evaluation.subgroups import check_predictions, groups_of, is_unknown, prob_columns


def _stack(
    preds_by_fm: Mapping[str, pd.DataFrame], factor: str, cluster: str, min_group_size: int
) -> tuple[pd.DataFrame, list[str]]:
    frames = []
    for fm, preds in preds_by_fm.items():
        y, probs = preds["y_true"].to_numpy().astype(int), preds[prob_columns(preds)].to_numpy()
        frames.append(
            pd.DataFrame(
                {
                    "correct": (probs.argmax(axis=1) == y).astype(float),
                    "cls": y,
                    "fm": fm,
                    "grp": groups_of(preds, factor).to_numpy(),
                    "cluster": preds[cluster].astype(str).to_numpy(),
                }
            )
        )
    data = pd.concat(frames, ignore_index=True)
    sizes = data.groupby("grp").size() / len(preds_by_fm)
    keep = [g for g, n in sizes.items() if n >= min_group_size and not is_unknown(str(g))]
    left_out = sorted(set(sizes.index) - set(keep))
    return data[data["grp"].isin(keep)].reset_index(drop=True), left_out


def _dummies(values: pd.Series, prefix: str) -> pd.DataFrame:
    """Treatment coding: one 0/1 column per level but the first (sorted)."""
    return pd.get_dummies(
        values.astype(str), prefix=prefix, prefix_sep="=", drop_first=True
    ).astype(float)


def _interact(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    cols = {f"{i}:{j}": a[i] * b[j] for i in a.columns for j in b.columns}
    return pd.DataFrame(cols, index=a.index)


def _design(data: pd.DataFrame, interaction: bool) -> tuple[pd.DataFrame, list[str]]:
    """Design matrix of ``correct ~ cls*fm + grp [+ grp:fm]`` and the columns under test.

    Built by hand rather than with a formula: the formula parser dominated the run time.
    """
    cls, fm, grp = (
        _dummies(data["cls"], "cls"),
        _dummies(data["fm"], "fm"),
        _dummies(data["grp"], "grp"),
    )
    parts = [pd.DataFrame({"const": 1.0}, index=data.index), cls, fm, _interact(cls, fm), grp]
    tested = list(grp.columns)
    if interaction:
        gxf = _interact(grp, fm)
        parts.append(gxf)
        tested = list(gxf.columns)
    design = pd.concat(parts, axis=1)
    return design.loc[:, design.any(axis=0)], tested


def _wald(data: pd.DataFrame, interaction: bool) -> tuple[float, int, float, str]:
    """Fit the patient-clustered logit and Wald-test the group (or group:fm) terms."""
    design, tested = _design(data, interaction)
    tested = [c for c in tested if c in design.columns]
    if not tested:
        return float("nan"), 0, float("nan"), "fewer than two groups"
    clusters = pd.factorize(data["cluster"])[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = sm.Logit(data["correct"].to_numpy(), design).fit(
                disp=0, cov_type="cluster", cov_kwds={"groups": clusters}, maxiter=200
            )
            restriction = np.zeros((len(tested), design.shape[1]))
            idx = [design.columns.get_loc(c) for c in tested]
            restriction[np.arange(len(tested)), idx] = 1.0
            test = res.wald_test(restriction, use_f=False, scalar=True)
    except Exception as err:  # noqa: BLE001 - singular fits are reported, not raised
        return float("nan"), 0, float("nan"), f"model failed: {type(err).__name__}: {err}"
    return float(test.statistic), len(tested), float(test.pvalue), ""


def _auroc_gap(preds: pd.DataFrame, factor: str, keep: list[str]) -> float:
    """AUROC range over the kept groups that hold two classes (NaN with fewer than two)."""
    y, probs = preds["y_true"].to_numpy().astype(int), preds[prob_columns(preds)].to_numpy()
    labels = groups_of(preds, factor).to_numpy()
    values = []
    for g in keep:
        mask = labels == g
        if len(np.unique(y[mask])) > 1:
            cl = np.arange(int(mask.sum()))
            values.append(MacroAuroc(y[mask], probs[mask], cl)(np.ones((1, len(cl))))[0])
    return float(np.ptp(values)) if len(values) > 1 else float("nan")


def _accuracy_by_group(data: pd.DataFrame) -> pd.DataFrame:
    return data.groupby(["grp", "fm"])["correct"].mean().unstack("fm")


def factor_effects(
    preds_by_fm: Mapping[str, pd.DataFrame],
    factors: Sequence[str],
    *,
    alpha: float = 0.05,
    correction: Literal["holm", "bh"] = "holm",
    min_group_size: int = 10,
    cluster: str = "patient_id",
) -> pd.DataFrame:
    """One row per factor: effect sizes, Wald chi2/df/p (raw and adjusted) and ``flagged``.

    ``preds_by_fm`` maps an FM name to its predictions on the same test images, each with
    ``group.<factor>`` columns from :func:`~retfm.evaluation.subgroups.add_groups`. With one FM
    only the performance question is asked (gap columns are NaN).
    """
    if not preds_by_fm:
        raise ValueError("factor_effects: no predictions given")
    fms = list(preds_by_fm)
    for fm, preds in preds_by_fm.items():
        try:
            check_predictions(preds)
        except ValueError as err:
            raise ValueError(f"FM {fm!r}: {err}") from None
    rows = []
    for factor in factors:
        data, left_out = _stack(preds_by_fm, factor, cluster, min_group_size)
        perf = _wald(data, interaction=False)
        gap = (
            _wald(data, interaction=True)
            if len(fms) > 1
            else (float("nan"), 0, float("nan"), "one FM")
        )
        acc = _accuracy_by_group(data)
        pooled = data.groupby("grp")["correct"].mean()
        kept = sorted(map(str, pooled.index))
        gaps = [_auroc_gap(preds, factor, kept) for preds in preds_by_fm.values()]
        rows.append(
            {
                "factor": factor,
                "groups": kept,
                "left_out": left_out,
                "n_images": int(len(data) / len(fms)),
                "perf_effect": float(pooled.max() - pooled.min()) if len(pooled) else np.nan,
                "perf_auroc_gap": float(np.nanmean(gaps)) if np.isfinite(gaps).any() else np.nan,
                "perf_stat": perf[0],
                "perf_df": perf[1],
                "perf_p": perf[2],
                "gap_effect": (
                    float(np.ptp(acc[fms[0]] - acc[fms[1]]))
                    if len(fms) > 1 and len(acc)
                    else np.nan
                ),
                "gap_stat": gap[0],
                "gap_df": gap[1],
                "gap_p": gap[2],
                "note": "; ".join(n for n in (perf[3], gap[3] if len(fms) > 1 else "") if n),
            }
        )
    out = pd.DataFrame(rows)
    for q in ("perf", "gap"):
        out[f"{q}_p_adj"] = adjust_pvalues(out[f"{q}_p"].to_numpy(), correction)
        out[f"{q}_flagged"] = (out[f"{q}_p_adj"] < alpha).fillna(False).astype(bool)
    return out
