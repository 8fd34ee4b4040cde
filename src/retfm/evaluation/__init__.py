"""Evaluation: metrics, per-subgroup fairness, bootstrap intervals, the deciding tests between
FMs, alignment and metadata-factor analysis, and the simulations that calibrate them. Pure
functions on DataFrames and arrays (no MLflow)."""

from retfm.evaluation.analysis import AnalysisConfig, StudyAnalysis, analyse_study
from retfm.evaluation.bootstrap import bootstrap_intervals
from retfm.evaluation.fairness import MetricKeys, fairness_summary, metric_keys, subgroup_table
from retfm.evaluation.metrics import overall_metrics
from retfm.evaluation.statistics import (
    adjust_pvalues,
    delong_test,
    paired_bootstrap,
    seed_ttest,
    seeded_paired_test,
)
from retfm.evaluation.subgroups import add_groups, check_predictions, group_column

__all__ = [
    "AnalysisConfig",
    "MetricKeys",
    "StudyAnalysis",
    "add_groups",
    "adjust_pvalues",
    "analyse_study",
    "bootstrap_intervals",
    "check_predictions",
    "delong_test",
    "fairness_summary",
    "group_column",
    "metric_keys",
    "overall_metrics",
    "paired_bootstrap",
    "seed_ttest",
    "seeded_paired_test",
    "subgroup_table",
]
