"""The study's analysis in one call: the code path that decides every conclusion.

:func:`analyse_study` is what the compare stage runs on the real predictions and what
``retfm calibrate`` runs on simulated ones, so the error rates and power it measures are those
of the conclusions the report prints. It answers:

1. per task, is one site's pre-training data better than another's: the **data-level**
   comparison, each FM's replicated pre-training runs pooled
   (:func:`~retfm.evaluation.comparison.compare_sites`); undetermined with one run per site;
2. per task, which pre-training *run* is better than which (the per-run comparison of runs
   with the same replicate index, :func:`~retfm.evaluation.comparison.compare_fms`), labelled
   as such: it says nothing about the data, since another draw moves it;
3. does alignment matter: per task with an aligned FM, and the headline fraction
   (:func:`~retfm.evaluation.alignment.alignment_verdicts`), from the data-level answer (and,
   labelled, from the per-run one);
4. which metadata factors change performance, or the gap between FMs
   (:func:`~retfm.evaluation.factors.factor_effects`), on each FM's ensemble over its runs and
   seeds.

A *run* is one pre-training run (a replicate, e.g. ``mae-hospital-r0``); an *FM* is a site x
recipe (``mae-hospital``), made of its runs (``replicate_of`` maps run -> FM).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from retfm.evaluation.alignment import alignment_verdicts
from retfm.evaluation.comparison import compare_fms, compare_sites, seed_average
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
    comparisons: pd.DataFrame  # data level: one row per task x FM pair, runs pooled
    alignment: pd.DataFrame  # data level: one row per task with an aligned FM
    headline: dict[str, Any]  # the alignment headline (data level)
    factors: pd.DataFrame  # one row per factor
    factor_groups: pd.DataFrame  # one row per factor x group: odds ratios
    run_comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)  # per pre-training run
    run_alignment: pd.DataFrame = field(default_factory=pd.DataFrame)
    run_headline: dict[str, Any] = field(default_factory=dict)


def read_adaptations(
    outputs: Path, fms: Sequence[str], tasks: Sequence[str]
) -> tuple[dict[Key, pd.DataFrame], dict[str, str]]:
    """The adapt stage's test predictions of every (run, task), all seeds, and each task's data
    site: what :func:`analyse_study` and a design-matched calibration read (``fms``: the
    pre-training runs' names, e.g. ``mae-hospital-r0``)."""
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


def _natural(name: str) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def fm_ensembles(
    preds: Mapping[Key, pd.DataFrame], replicate_of: Mapping[str, str]
) -> dict[Key, pd.DataFrame]:
    """(FM, task) -> the predictions of all its runs as one table, every (run, seed) a seed of
    its own (seed = replicate index x 1000 + seed): the FM's ensemble for the factor analysis."""
    by_fm: dict[Key, list[pd.DataFrame]] = {}
    index = replicate_indices(replicate_of, [run for run, _ in preds])
    for (run, task), frame in preds.items():
        seed = frame.get("seed", 0)
        by_fm.setdefault((replicate_of.get(run, run), task), []).append(
            frame.assign(seed=index[run] * 1000 + seed)
        )
    return {k: v[0] if len(v) == 1 else pd.concat(v, ignore_index=True) for k, v in by_fm.items()}


def replicate_indices(replicate_of: Mapping[str, str], runs: Sequence[str]) -> dict[str, int]:
    """Each run's position among its FM's runs (natural order: r2 before r10)."""
    by_fm: dict[str, list[str]] = {}
    for run in dict.fromkeys(runs):
        by_fm.setdefault(replicate_of.get(run, run), []).append(run)
    return {r: i for mine in by_fm.values() for i, r in enumerate(sorted(mine, key=_natural))}


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
    replicate_of: Mapping[str, str] | None = None,
) -> StudyAnalysis:
    """Decide every question of the study from per-seed test predictions.

    ``preds``: (run, task) -> per-seed predictions (image_id, patient_id, y_true, prob_*, seed,
    and age / sex / ethnicity where known); ``fm_sites``: FM -> pre-training site;
    ``task_sites``: task -> data site; ``fm_recipes``: FM -> recipe (FMs are compared only
    within a recipe when given); ``replicate_of``: run -> FM (None: every run is an FM of its
    own, so every data-level verdict is undetermined). ``factors=False`` skips the factor
    analysis.
    """
    replicate_of = dict(replicate_of or {run: run for run, _ in preds})
    runs = list(dict.fromkeys(run for run, _ in preds))
    index = replicate_indices(replicate_of, runs)
    run_sites = {r: fm_sites[replicate_of[r]] for r in runs if replicate_of[r] in fm_sites}
    run_recipes = (
        {r: fm_recipes[replicate_of[r]] for r in runs if replicate_of[r] in fm_recipes}
        if fm_recipes
        else None
    )
    tests = {"alpha": config.alpha, "correction": config.correction, "ci": config.ci,
             "power": config.power}  # fmt: skip
    run_comparisons = compare_fms(
        preds,
        **tests,  # type: ignore[arg-type]
        same_recipe=run_recipes,
        pairs=lambda a, b: replicate_of[a] != replicate_of[b] and index[a] == index[b],
    )
    run_alignment, run_headline = alignment_verdicts(run_comparisons, run_sites, task_sites)
    comparisons = compare_sites(preds, replicate_of, **tests, same_recipe=fm_recipes)  # type: ignore[arg-type]
    per_task, headline = alignment_verdicts(comparisons, fm_sites, task_sites)
    if factors:
        grouped = _grouped(fm_ensembles(preds, replicate_of), config)
        factor_table, groups = factor_effects(
            grouped,
            _testable(grouped, config.factors),
            alpha=config.alpha,
            correction=config.correction,
            min_group_size=config.min_group_size,
        )
    else:
        factor_table, groups = pd.DataFrame(), pd.DataFrame()
    return StudyAnalysis(
        comparisons,
        per_task,
        headline,
        factor_table,
        groups,
        run_comparisons,
        run_alignment,
        run_headline,
    )
