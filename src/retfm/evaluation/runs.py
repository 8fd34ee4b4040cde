"""Everything one adaptation run's test predictions say: overall metrics, per-subgroup tables,
fairness gaps, bootstrap intervals, and the flat MLflow metric keys built from them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from retfm.evaluation.bootstrap import bootstrap_intervals
from retfm.evaluation.fairness import (
    MetricKeys,
    fairness_summary,
    metric_keys,
    slug,
    subgroup_table,
)
from retfm.evaluation.metrics import overall_metrics
from retfm.evaluation.subgroups import add_groups, arrays
from retfm.settings import FACTORS, EvaluationSettings


@dataclass(frozen=True)
class RunEvaluation:
    overall: dict[str, float]
    groups: pd.DataFrame  # one row per (factor, group), with bootstrap intervals of AUROC
    summaries: list[dict]
    keys: MetricKeys
    intervals: pd.DataFrame


def groupings(cfg: EvaluationSettings, recorded: Iterable[str] = FACTORS) -> list[str]:
    """Factor names to split on: the age binnings, then sex / ethnicity, for the metadata
    columns ``recorded`` (all factors by default: what the study judges where it exists)."""
    recorded = set(recorded)
    names: list[str] = []
    if "age" in cfg.factors and "age" in recorded:
        names += list(cfg.age_bins)
    names += [f for f in cfg.factors if f != "age" and f in recorded]
    return names + [c for c in cfg.intersections if all(p in names for p in c.split("*"))]


def evaluate_predictions(
    preds: pd.DataFrame, cfg: EvaluationSettings, *, seed: int = 0
) -> RunEvaluation:
    age_bins = cfg.age_bins if "age" in cfg.factors and "age" in preds.columns else {}
    factors = groupings(cfg, preds.columns)
    grouped = add_groups(preds, age_bins, [f for f in factors if "*" in f])
    y, probs = arrays(grouped)
    overall = overall_metrics(y, probs)
    tables = [subgroup_table(grouped, f, min_group_size=cfg.min_group_size) for f in factors]
    summaries = [fairness_summary(t, overall["auroc"]) for t in tables]
    keys = metric_keys(overall, tables, summaries)
    intervals = (
        bootstrap_intervals(grouped, factors, n_boot=cfg.n_boot, ci=cfg.ci, seed=seed)
        if cfg.n_boot
        else pd.DataFrame()
    )
    groups = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if len(intervals) and len(groups):
        auc = intervals[intervals["metric"] == "auroc"][["factor", "group", "lo", "hi"]]
        groups = groups.merge(
            auc.rename(columns={"lo": "auroc_lo", "hi": "auroc_hi"}),
            on=["factor", "group"],
            how="left",
        )
        _interval_keys(keys, groups)
    return RunEvaluation(overall, groups, summaries, keys, intervals)


def _interval_keys(keys: MetricKeys, groups: pd.DataFrame) -> None:
    """Each defined group's bootstrap interval beside its AUROC: ``auroc_lo/age/ge60`` and
    ``auroc_hi/age/ge60``, so MLflow's charts and Compare can show it (not only a JSON file)."""
    for row in groups.itertuples(index=False):
        f, g = slug(row.factor), slug(row.group)
        for col in ("auroc_lo", "auroc_hi"):
            value = getattr(row, col, None)
            if bool(row.defined) and value is not None and np.isfinite(value):
                keys.metrics[f"{col}/{f}/{g}"] = float(value)
                keys.labels[f"{col}/{f}/{g}"] = f"{col}/{row.factor}={row.group}"
