"""The study's analysis in one call: the code path that decides every conclusion.

:func:`analyse_study` is what the compare stage runs on the real predictions and what
``retfm calibrate`` runs on simulated ones, so the error rates and power it measures are those
of the conclusions the report prints. It answers:

1. per task, which FM is better (:func:`~retfm.evaluation.comparison.compare_fms`);
2. does alignment matter: per task with an aligned FM, and the headline fraction
   (:func:`~retfm.evaluation.alignment.alignment_verdicts`);
3. which metadata factors change performance, or the gap between FMs
   (:func:`~retfm.evaluation.factors.factor_effects`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from retfm.evaluation.alignment import alignment_verdicts
from retfm.evaluation.comparison import compare_fms, seed_average
from retfm.evaluation.factors import factor_effects
from retfm.evaluation.subgroups import add_groups

Key = tuple[str, str]  # (fm, task)


@dataclass(frozen=True)
class AnalysisConfig:
    alpha: float = 0.05
    correction: Literal["holm", "bh"] = "holm"
    ci: float = 0.95
    power: float = 0.8
    factors: tuple[str, ...] = ("age", "age_fine", "sex", "ethnicity")  # groupings to test
    age_bins: Mapping[str, list[float]] = field(
        default_factory=lambda: {"age": [60.0], "age_fine": [40.0, 60.0, 80.0]}
    )
    intersections: tuple[str, ...] = ()
    min_group_size: int = 10

    @classmethod
    def from_settings(cls, settings: Any) -> AnalysisConfig:
        """From the typed settings (``compare`` and ``evaluation`` sections)."""
        from retfm.evaluation.runs import groupings

        ev = settings.evaluation
        return cls(
            alpha=settings.compare.alpha,
            correction=settings.compare.correction,
            ci=ev.ci,
            power=settings.compare.power,
            factors=tuple(groupings(ev)),
            age_bins={k: list(v) for k, v in ev.age_bins.items()} if "age" in ev.factors else {},
            intersections=tuple(ev.intersections),
            min_group_size=ev.min_group_size,
        )


@dataclass(frozen=True)
class StudyAnalysis:
    comparisons: pd.DataFrame  # one row per task x FM pair
    alignment: pd.DataFrame  # one row per task with an aligned FM
    headline: dict[str, Any]  # the alignment headline
    factors: pd.DataFrame  # one row per factor
    factor_groups: pd.DataFrame  # one row per factor x group: odds ratios


def read_adaptations(
    outputs: Path, fms: Sequence[str], tasks: Sequence[str]
) -> tuple[dict[Key, pd.DataFrame], dict[str, str]]:
    """The adapt stage's test predictions of every (FM, task), all seeds, and each task's data
    site: what :func:`analyse_study` and a design-matched calibration read."""
    preds: dict[Key, pd.DataFrame] = {}
    task_sites: dict[str, str] = {}
    for fm in fms:
        for task in tasks:
            folder = Path(outputs) / "adapt" / fm / task
            if not (folder / "predictions.parquet").is_file():
                raise FileNotFoundError(
                    f"{folder}/predictions.parquet not found: run `dvc repro adapt@{fm}-{task}`"
                )
            preds[(fm, task)] = pd.read_parquet(folder / "predictions.parquet")
            task_sites[task] = json.loads((folder / "runs.json").read_text())["task_site"]
    return preds, task_sites


def _grouped(preds: Mapping[Key, pd.DataFrame], config: AnalysisConfig) -> dict[Key, pd.DataFrame]:
    out = {}
    for key, frame in preds.items():
        bins = config.age_bins if "age" in frame.columns else {}
        out[key] = add_groups(seed_average(frame), bins, config.intersections)
    return out


def _testable(grouped: Mapping[Key, pd.DataFrame], factors: Sequence[str]) -> list[str]:
    """Factors every prediction table has group labels for."""
    return [f for f in factors if all(f"group.{f}" in g.columns for g in grouped.values())]


def analyse_study(
    preds: Mapping[Key, pd.DataFrame],
    fm_sites: Mapping[str, str],
    task_sites: Mapping[str, str],
    config: AnalysisConfig = AnalysisConfig(),
    *,
    fm_recipes: Mapping[str, str] | None = None,
    factors: bool = True,
) -> StudyAnalysis:
    """Decide every question of the study from per-seed test predictions.

    ``preds``: (fm, task) -> per-seed predictions (image_id, patient_id, y_true, prob_*, seed,
    and age / sex / ethnicity where known); ``fm_sites``: FM -> pre-training site;
    ``task_sites``: task -> data site; ``fm_recipes``: FM -> recipe (FMs are compared only
    within a recipe when given). ``factors=False`` skips the factor analysis.
    """
    comparisons = compare_fms(
        preds,
        alpha=config.alpha,
        correction=config.correction,
        ci=config.ci,
        power=config.power,
        same_recipe=fm_recipes,
    )
    per_task, headline = alignment_verdicts(comparisons, fm_sites, task_sites)
    if factors:
        grouped = _grouped(preds, config)
        factor_table, groups = factor_effects(
            grouped,
            _testable(grouped, config.factors),
            alpha=config.alpha,
            correction=config.correction,
            min_group_size=config.min_group_size,
        )
    else:
        factor_table, groups = pd.DataFrame(), pd.DataFrame()
    return StudyAnalysis(comparisons, per_task, headline, factor_table, groups)
