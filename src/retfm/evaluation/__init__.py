"""Evaluation: metrics, per-subgroup fairness, bootstrap intervals, tests between FMs,
alignment and metadata-factor analysis. Pure functions on DataFrames and arrays (no MLflow)."""

from retfm.evaluation.alignment import aligned_comparisons, alignment_matrix, alignment_summary
from retfm.evaluation.bootstrap import bootstrap_intervals
from retfm.evaluation.factors import factor_effects
from retfm.evaluation.fairness import MetricKeys, fairness_summary, metric_keys, subgroup_table
from retfm.evaluation.metrics import overall_metrics
from retfm.evaluation.statistics import adjust_pvalues, delong_test, paired_bootstrap, seed_ttest
from retfm.evaluation.subgroups import add_groups, check_predictions, group_column

__all__ = [
    "MetricKeys",
    "add_groups",
    "adjust_pvalues",
    "aligned_comparisons",
    "alignment_matrix",
    "alignment_summary",
    "bootstrap_intervals",
    "check_predictions",
    "delong_test",
    "factor_effects",
    "fairness_summary",
    "group_column",
    "metric_keys",
    "overall_metrics",
    "paired_bootstrap",
    "seed_ttest",
    "subgroup_table",
]
