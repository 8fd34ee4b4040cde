"""Calibration and power of the study's decisions, measured by running the study's own analysis
(:func:`~retfm.evaluation.analysis.analyse_study`) on simulated studies
(:mod:`retfm.evaluation.simulation`).

* **False-positive rates** under a realistic null (both FMs equally good in the population, no
  factor effect inside any task): how often a task's FM comparison is decided either way, how
  often the aligned FM is called better (the alignment headline), how often each factor is
  flagged, and how often a study flags anything at all. Each with its exact (Clopper-Pearson)
  95% interval; the target is an interval whose upper end is at most alpha + 0.02. RETFound's
  t-test over seeds is measured beside it, to show what the deciding test replaced.
* **Power** at a grid of planted effects and test-set sizes: the aligned FM's population AUROC
  advantage, and an age effect inside every task.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from tqdm import tqdm

from retfm.evaluation.analysis import AnalysisConfig, StudyAnalysis, analyse_study
from retfm.evaluation.simulation import StudyDesign, bonus_for_difference, simulate_study
from retfm.evaluation.statistics import adjust_pvalues
from retfm.evaluation.subgroups import prob_columns
from retfm.evaluation.verdicts import BETTER, EFFECT, NO_EVIDENCE, is_undetermined

TARGET_SLACK = 0.02  # the null rate's 95% upper bound may exceed alpha by at most this

COMPARISON = "data level: comparison (either site's FM called better), per task"
COMPARISON_STUDY = "data level: any comparison decided, per study"
ALIGNMENT = "data level: aligned FM called better, per task"
ALIGNMENT_STUDY = "data level: aligned FM called better on any task, per study"
RUN_COMPARISON = "per run: comparison (either run called better), per task and run pair"
RUN_ALIGNMENT = "per run: aligned run called better, per task"
SEED_TTEST = "RETFound seed t-test, aligned called better, per task (not used)"
ANY_FACTOR = "any factor flagged, per study"
#: The rates the report and the summary quote, by short name.
HEADLINE = {
    "data-level comparison (per study)": COMPARISON_STUDY,
    "aligned FM better (per study)": ALIGNMENT_STUDY,
    "per-run comparison": RUN_COMPARISON,
    "any factor flagged": ANY_FACTOR,
}
#: Family-wise rates, held to [alpha / 2, alpha + 0.02] (the aligned-better one to the
#: one-sided alpha / 2: [alpha / 4, alpha / 2 + 0.02]).
FAMILY_TARGETS = {COMPARISON_STUDY: 1.0, ALIGNMENT_STUDY: 0.5}


@dataclass(frozen=True)
class Rate:
    """k events in n trials, with the exact 95% interval."""

    k: int
    n: int

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        if not self.n:
            return float("nan"), float("nan")
        ci = stats.binomtest(self.k, self.n).proportion_ci(0.95, method="exact")
        return float(ci.low), float(ci.high)

    def as_dict(self) -> dict[str, float | int]:
        lo, hi = self.interval
        return {"k": self.k, "n": self.n, "rate": self.rate, "lo": lo, "hi": hi}

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{self.rate:6.1%} [{lo:5.1%}, {hi:5.1%}] ({self.k}/{self.n})"


# --------------------------------------------------------------------------- running studies


@dataclass(frozen=True)
class _Job:
    design: StudyDesign
    config: AnalysisConfig
    seed: int
    factors: bool


def _outcome(job: _Job) -> dict[str, Any]:
    """What one simulated study decided, reduced to the counts the rates need."""
    preds = simulate_study(job.design, job.seed)
    tasks = {t.name: t.site for t in job.design.tasks}
    result = analyse_study(
        preds,
        job.design.fms,
        tasks,
        job.config,
        fm_recipes=job.design.recipes,
        factors=job.factors,
        replicate_of=job.design.replicate_of(),
    )
    return summarise(result, job.config.alpha, job.config.correction)


def summarise(result: StudyAnalysis, alpha: float, correction: str = "holm") -> dict[str, Any]:
    """Per task: data-level and per-run comparison verdicts, alignment verdicts, seed t-test
    verdict; per factor: flags."""
    comp = result.run_comparisons
    data = result.comparisons
    seed_adj = adjust_pvalues(comp["p_seed_ttest"].to_numpy(), correction)  # type: ignore[arg-type]
    run_align = result.run_alignment
    out: dict[str, Any] = {
        "comparison": {f"{r.task}:{r.fm_a}-{r.fm_b}": r.verdict for r in data.itertuples()},
        "run_comparison": {f"{r.task}:{r.fm_a}-{r.fm_b}": r.verdict for r in comp.itertuples()},
        "run_alignment": dict(zip(run_align["task"], run_align["verdict"], strict=True)),
        "seed_ttest": {
            f"{r.task}:{r.fm_a}-{r.fm_b}": bool(p < alpha)
            for r, p in zip(comp.itertuples(), seed_adj, strict=True)
        },
        "seed_ttest_aligned_better": {},
        "alignment": dict(zip(result.alignment["task"], result.alignment["verdict"], strict=True)),
        "factors": {},
        "gap_factors": {},
    }
    aligned_fms = {r.task: set(str(r.aligned_fms).split(",")) for r in run_align.itertuples()}
    for r, p in zip(comp.itertuples(), seed_adj, strict=True):
        aligned = aligned_fms.get(r.task, set())
        if (r.fm_a in aligned) != (r.fm_b in aligned):
            diff = r.diff if r.fm_a in aligned else -r.diff
            out["seed_ttest_aligned_better"][r.task] = bool(p < alpha and diff > 0)
    if len(result.factors):
        for r in result.factors.itertuples():
            out["factors"][r.factor] = r.perf_verdict
            out["gap_factors"][r.factor] = r.gap_verdict
    return out


def run_studies(
    design: StudyDesign,
    config: AnalysisConfig,
    n_studies: int,
    *,
    seed: int = 0,
    factors: bool = True,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "simulated studies",
) -> list[dict[str, Any]]:
    """Simulate and analyse ``n_studies`` studies (in ``workers`` processes)."""
    jobs = [_Job(design, config, seed * 1_000_003 + i, factors) for i in range(n_studies)]
    workers = workers or min(2, os.cpu_count() or 1)
    bar = tqdm(total=n_studies, desc=desc, unit="study", disable=not progress, leave=False)
    results: list[dict[str, Any]] = []
    if workers <= 1 or n_studies < 8:
        for job in jobs:
            results.append(_outcome(job))
            bar.update()
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for res in pool.imap(_outcome, jobs, chunksize=4):
                results.append(res)
                bar.update()
    bar.close()
    return results


# --------------------------------------------------------------------------- rates


def _count(outcomes: Iterable[dict[str, Any]], pick: Callable[[dict[str, Any]], list[bool]]):
    k = n = 0
    for o in outcomes:
        hits = pick(o)
        k += sum(hits)
        n += len(hits)
    return Rate(k, n)


def _decided(verdicts: Iterable[str]) -> list[str]:
    return [v for v in verdicts if not is_undetermined(v)]


def _flagged(section: str, factor: str) -> Callable[[dict[str, Any]], list[bool]]:
    """Picks whether ``factor`` was flagged in one study's ``section`` (none when not tested)."""

    def pick(outcome: dict[str, Any]) -> list[bool]:
        verdicts = outcome[section]
        return [verdicts[factor] == EFFECT] if factor in verdicts else []

    return pick


def null_rates(outcomes: Sequence[dict[str, Any]]) -> dict[str, Rate]:
    """False-positive rates from studies simulated under the null."""

    def decided_any(section: str, hit: Callable[[str], bool]):
        def pick(o: dict[str, Any]) -> list[bool]:
            verdicts = _decided(o[section].values())
            return [any(map(hit, verdicts))] if verdicts else []

        return pick

    rates: dict[str, Rate] = {
        COMPARISON: _count(
            outcomes, lambda o: [v != NO_EVIDENCE for v in _decided(o["comparison"].values())]
        ),
        COMPARISON_STUDY: _count(outcomes, decided_any("comparison", lambda v: v != NO_EVIDENCE)),
        ALIGNMENT: _count(
            outcomes, lambda o: [v == BETTER for v in _decided(o["alignment"].values())]
        ),
        ALIGNMENT_STUDY: _count(outcomes, decided_any("alignment", lambda v: v == BETTER)),
        RUN_COMPARISON: _count(
            outcomes,
            lambda o: [v != NO_EVIDENCE for v in _decided(o["run_comparison"].values())],
        ),
        RUN_ALIGNMENT: _count(
            outcomes, lambda o: [v == BETTER for v in _decided(o["run_alignment"].values())]
        ),
        SEED_TTEST: _count(outcomes, lambda o: list(o["seed_ttest_aligned_better"].values())),
    }
    factors = sorted({f for o in outcomes for f in o["factors"]})
    for f in factors:
        rates[f"factor {f} flagged"] = _count(outcomes, _flagged("factors", f))
        rates[f"factor {f} changes the FM gap"] = _count(outcomes, _flagged("gap_factors", f))
    if factors:
        rates[ANY_FACTOR] = _count(
            outcomes,
            lambda o: [
                any(v == EFFECT for v in [*o["factors"].values(), *o["gap_factors"].values()])
            ],
        )
    undetermined = _count(
        outcomes,
        lambda o: [is_undetermined(v) for v in o["comparison"].values()],
    )
    rates["data-level comparisons undetermined (not counted above)"] = undetermined
    return rates


def within_target(rate: Rate, alpha: float, key: str = "") -> bool:
    """A per-decision rate: its 95% upper bound at most alpha + 0.02. A family-wise rate
    (:data:`FAMILY_TARGETS`, at its level): the target range [level / 2, level + 0.02] (neither
    far above nor far below it: a test too strict costs power), judged by the 95% interval:
    within target unless the interval lies wholly outside that range."""
    lo, hi = rate.interval
    if key in FAMILY_TARGETS:
        level = alpha * FAMILY_TARGETS[key]
        return hi >= level / 2 and lo <= level + TARGET_SLACK
    return hi <= alpha + TARGET_SLACK


def describe(design: StudyDesign) -> dict[str, Any]:
    return {
        "fms": dict(design.fms),
        "seeds": design.seeds,
        "replicates": design.replicates,
        "fm_shared": design.noise.fm_shared,
        "tasks": [
            {
                "task": t.name,
                "site": t.site,
                "test_images": t.n_test,
                "classes": t.n_classes,
                "resampled_from_study": t.patients is not None,
                "draw_logit_sd": t.draw if t.draw is not None else design.noise.draw,
            }
            for t in design.tasks
        ],
    }


def calibrate_null(
    design: StudyDesign,
    config: AnalysisConfig,
    n_studies: int,
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """False-positive rates of every decision at ``design`` under the null, JSON-able."""
    rates = null_rates(
        run_studies(
            design,
            config,
            n_studies,
            seed=seed,
            progress=progress,
            desc="calibration (null studies)",
        )
    )
    return {
        "n_studies": n_studies,
        "alpha": config.alpha,
        "target_upper": config.alpha + TARGET_SLACK,
        "design": describe(design),
        "headline": {
            short: rates[key].as_dict() for short, key in HEADLINE.items() if key in rates
        },
        "rates": {key: rate.as_dict() for key, rate in rates.items()},
        "judged": judged(rates),
        "within_target": all(within_target(rates[k], config.alpha, k) for k in judged(rates)),
    }


def judged(rates: dict[str, Rate]) -> list[str]:
    """The decisions held to the target: the data-level family (any comparison decided; the
    aligned FM called better on any task) and each factor's two verdicts; rates with no
    decided trial (one run per site: every data-level verdict is undetermined) are not judged.
    The family-wise "any factor flagged" rate is reported beside them against its nominal
    alpha, not held to alpha + 0.02 by its upper bound: a family held at exactly alpha has an
    upper bound above alpha + 0.02 at 500 studies (25/500: 7.3%), so that bound would fail a
    perfectly calibrated procedure."""
    per_factor = [k for k in rates if k.startswith("factor ")]
    # the per-run comparison is reported, not judged: under a null where only the draws differ
    # its "one run better" is often true of the two runs (13% of run pairs at draw sd 0.02)
    keys = (COMPARISON, COMPARISON_STUDY, ALIGNMENT_STUDY, *per_factor)
    return [k for k in keys if k in rates and rates[k].n]


# --------------------------------------------------------------------------- power


def alignment_power(
    design: StudyDesign,
    config: AnalysisConfig,
    differences: Sequence[float],
    test_sizes: Sequence[int],
    n_studies: int,
    *,
    seed: int = 1,
    progress: bool = True,
) -> pd.DataFrame:
    """P(aligned FM called better) per task with an aligned FM, with the advantage planted on
    every such task, for each population AUROC difference x test-set size."""
    rows = []
    for n_test in test_sizes:
        sized = design.with_test_size(n_test)
        aligned_tasks = [t for t in sized.tasks if t.site in set(sized.fms.values())]
        for delta in differences:
            bonus = {t.name: bonus_for_difference(t, sized, delta) for t in aligned_tasks}
            planted = sized.with_effects(alignment=bonus)
            outcomes = run_studies(
                planted,
                config,
                n_studies,
                seed=seed,
                factors=False,
                progress=progress,
                desc=f"power n={n_test} d={delta}",
            )
            rate = _count(outcomes, lambda o: [v == BETTER for v in o["alignment"].values()])
            rows.append({"test_images": n_test, "auroc_difference": delta, **rate.as_dict()})
    return pd.DataFrame(rows)


def with_draw_auroc(design: StudyDesign, sd: float) -> StudyDesign:
    """``design`` with each task's draw set to move a run's population AUROC by sd ``sd``."""
    tasks = tuple(replace(t, draw=bonus_for_difference(t, design, sd)) for t in design.tasks)
    return replace(design, tasks=tasks)


def single_draw_rates(
    design: StudyDesign,
    config: AnalysisConfig,
    draw_sds: Sequence[float],
    n_studies: int,
    *,
    seed: int = 5,
    progress: bool = True,
) -> pd.DataFrame:
    """How often the per-run test (one pre-training run per site, as a study without
    replicates has) calls the aligned FM better when the sites' data are equally good and only
    the draws differ, by the draw's AUROC sd."""
    rows = []
    for sd in draw_sds:
        null = with_draw_auroc(design.with_replicates(1), sd)
        outcomes = run_studies(null, config, n_studies, seed=seed, factors=False,
                               progress=progress, desc=f"single draw, sd {sd}")  # fmt: skip
        per_task = _count(
            outcomes, lambda o: [v == BETTER for v in _decided(o["run_alignment"].values())]
        )
        per_study = _count(
            outcomes, lambda o: [any(v == BETTER for v in o["run_alignment"].values())]
        )
        rows.append({"draw_auroc_sd": sd, **{f"task_{k}": v for k, v in per_task.as_dict().items()},
                     **{f"study_{k}": v for k, v in per_study.as_dict().items()}})  # fmt: skip
    return pd.DataFrame(rows)


def power_by_replicates(
    design: StudyDesign,
    config: AnalysisConfig,
    differences: Sequence[float],
    replicates: Sequence[int],
    n_studies: int,
    *,
    seed: int = 6,
    progress: bool = True,
) -> pd.DataFrame:
    """P(aligned FM called better at the data level), per task with an aligned FM, for each
    population AUROC advantage x replicates per site (the design's draw variance)."""
    rows = []
    for k in replicates:
        for delta in differences:
            sized = design.with_replicates(k)
            aligned = [t for t in sized.tasks if t.site in set(sized.fms.values())]
            planted = sized.with_effects(
                alignment={t.name: bonus_for_difference(t, sized, delta) for t in aligned}
            )
            outcomes = run_studies(planted, config, n_studies, seed=seed, factors=False,
                                   progress=progress, desc=f"power K={k} d={delta}")  # fmt: skip
            rate = _count(outcomes, lambda o: [v == BETTER for v in o["alignment"].values()])
            rows.append({"replicates": k, "auroc_difference": delta, **rate.as_dict()})
    return pd.DataFrame(rows)


def factor_power(
    design: StudyDesign,
    config: AnalysisConfig,
    age_effects: Sequence[float],
    test_sizes: Sequence[int],
    n_studies: int,
    *,
    seed: int = 2,
    progress: bool = True,
) -> pd.DataFrame:
    """P(age flagged) and P(sex / ethnicity flagged) with an age effect planted in every task;
    ``auroc_gap`` is the mean within-task AUROC gap between age groups (<60 vs >=60) that the
    effect produced."""
    rows = []
    for n_test in test_sizes:
        for effect in age_effects:
            planted = design.with_test_size(n_test).with_effects(age=effect)
            outcomes = run_studies(
                planted,
                config,
                n_studies,
                seed=seed,
                progress=progress,
                desc=f"factor power n={n_test} age={effect}",
            )
            row: dict[str, Any] = {"test_images": n_test, "age_effect": effect}
            for f in ("age", "sex", "ethnicity"):
                rate = _count(outcomes, _flagged("factors", f))
                row[f"{f}_flagged"] = rate.rate
                if f == "age":
                    row["age_lo"], row["age_hi"] = rate.interval
            row["n"] = len(outcomes)
            rows.append(row)
    return pd.DataFrame(rows)


def age_gap_of(design: StudyDesign, effect: float, n_test: int = 20_000) -> float:
    """Mean over tasks of the population AUROC gap between <60 and >=60 for an age effect."""
    from retfm.evaluation.statistics import auroc_influence

    big = replace(design.with_test_size(n_test).with_effects(age=effect), seeds=1)
    preds = simulate_study(big, 11)
    gaps = []
    for (fm, _task), frame in preds.items():
        if fm != next(iter(design.fms)):
            continue
        probs = frame[prob_columns(frame)].to_numpy()
        y, old = frame["y_true"].to_numpy(), frame["age"].to_numpy() >= 60
        young_auc = auroc_influence(y[~old], probs[~old])[0]
        old_auc = auroc_influence(y[old], probs[old])[0]
        gaps.append(young_auc - old_auc)
    return float(np.mean(gaps))


def calibration_report(
    design: StudyDesign,
    config: AnalysisConfig,
    *,
    null_studies: int = 500,
    power_studies: int = 200,
    differences: Sequence[float] = (0.02, 0.04, 0.06, 0.08),
    test_sizes: Sequence[int] = (120, 600, 2000),
    age_effects: Sequence[float] = (0.4, 0.6, 0.9),
    draw_sds: Sequence[float] = (0.01, 0.02, 0.03),
    replicates: Sequence[int] = (1, 2, 3, 5),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Everything ``retfm calibrate`` prints: null rates at ``design`` and at every test-set
    size, the single-draw test's rate when only draws differ (``draw_sds``), and the power
    grids (by test size, by replicates per site, for an age effect). JSON-able."""
    report: dict[str, Any] = {
        "null": calibrate_null(design, config, null_studies, seed=seed, progress=progress)
    }
    by_size = {}
    for n_test in test_sizes:
        sized = design.with_test_size(n_test)
        if [t.n_test for t in sized.tasks] == [t.n_test for t in design.tasks]:
            continue
        by_size[str(n_test)] = calibrate_null(
            sized, config, max(100, null_studies // 3), seed=seed + n_test, progress=progress
        )
    report["null_by_test_size"] = by_size
    if draw_sds:
        report["single_draw"] = single_draw_rates(
            design, config, draw_sds, max(100, null_studies // 2), seed=seed + 5,
            progress=progress,
        ).to_dict(orient="records")  # fmt: skip
    if power_studies:
        if replicates:
            report["power_by_replicates"] = power_by_replicates(
                design, config, differences, replicates, power_studies, seed=seed + 6,
                progress=progress,
            ).to_dict(orient="records")  # fmt: skip
        report["alignment_power"] = alignment_power(
            design, config, differences, test_sizes, power_studies, seed=seed + 1,
            progress=progress,
        ).to_dict(orient="records")  # fmt: skip
        factor = factor_power(
            design, config, age_effects, test_sizes, max(50, power_studies // 2),
            seed=seed + 2, progress=progress,
        )  # fmt: skip
        factor["auroc_gap"] = [age_gap_of(design, e) for e in factor["age_effect"]]
        report["factor_power"] = factor.to_dict(orient="records")
    report["within_target"] = report["null"]["within_target"] and all(
        r["within_target"] for r in by_size.values()
    )
    return report
