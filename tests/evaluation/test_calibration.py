"""The study's decisions, calibrated by the project's own simulation (quick version; the full
one is ``retfm calibrate`` / benchmarks/bench_calibration.py). These tests fail if a decision
is made anti-conservative again (deciding alignment with a t-test over seeds, or reading one
pre-training run per site as a verdict about the data) or needlessly strict."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from retfm.evaluation import comparison
from retfm.evaluation.analysis import AnalysisConfig
from retfm.evaluation.calibration import (
    ALIGNMENT,
    ALIGNMENT_STUDY,
    ANY_FACTOR,
    COMPARISON,
    COMPARISON_STUDY,
    RUN_ALIGNMENT,
    RUN_COMPARISON,
    SEED_TTEST,
    Rate,
    alignment_power,
    calibrate_null,
    null_rates,
    power_by_replicates,
    run_studies,
    single_draw_rates,
    with_draw_auroc,
    within_target,
)
from retfm.evaluation.simulation import demo_like_design, design_from_predictions, simulate_study
from retfm.evaluation.statistics import PairedResult, seed_ttest, seeded_paired_test

ALPHA = 0.05
QUICK = 90  # null studies: enough to tell 5% from the 13-39% of a seeds-only test
DRAW_SD = 0.03  # between-draw sd of a run's population AUROC (the demo measured 0.017-0.038)


def _clearly_above_nominal(rate: Rate, nominal: float) -> bool:
    return rate.interval[0] > nominal


def _replicated(k: int = 3, n_test: int = 300):
    """The demo's shape with ``k`` pre-training runs per site, each drawn with DRAW_SD."""
    return with_draw_auroc(demo_like_design(n_test).with_replicates(k), DRAW_SD)


@pytest.fixture(scope="module")
def null_outcomes():
    """Null studies where the sites' data are equally good but every run is its own draw."""
    return run_studies(_replicated(), AnalysisConfig(alpha=ALPHA), QUICK, progress=False)


def test_data_level_null_rates_are_near_nominal(null_outcomes):
    rates = null_rates(null_outcomes)
    assert rates[COMPARISON].n == 3 * QUICK and rates[COMPARISON_STUDY].n == QUICK
    for key, nominal in ((COMPARISON, ALPHA), (ALIGNMENT, ALPHA / 2), (ANY_FACTOR, ALPHA)):
        assert not _clearly_above_nominal(rates[key], nominal), (key, str(rates[key]))
    # the per-study family: neither above alpha nor far below it (a test too strict loses power)
    assert within_target(rates[COMPARISON_STUDY], ALPHA, COMPARISON_STUDY), str(
        rates[COMPARISON_STUDY]
    )
    assert within_target(rates[ALIGNMENT_STUDY], ALPHA, ALIGNMENT_STUDY)


def test_the_per_run_test_is_fooled_by_the_draw(null_outcomes):
    """The per-run test, right about the two runs, calls equally good data different far
    above alpha when draws vary: it cannot be the data-level verdict."""
    rates = null_rates(null_outcomes)
    assert _clearly_above_nominal(rates[RUN_COMPARISON], ALPHA), str(rates[RUN_COMPARISON])


def test_the_seed_ttest_that_was_replaced_is_caught_by_the_same_check(null_outcomes):
    rate = null_rates(null_outcomes)[SEED_TTEST]
    assert _clearly_above_nominal(rate, ALPHA / 2), str(rate)


def test_one_run_per_site_gives_undetermined_data_level_verdicts():
    outcomes = run_studies(_replicated(k=1), AnalysisConfig(), 5, factors=False,
                           progress=False, workers=1)  # fmt: skip
    for o in outcomes:
        assert set(o["comparison"].values()) == {"undetermined (one pre-training run per site)"}, o[
            "comparison"
        ]
        assert all(v.startswith("undetermined") for v in o["alignment"].values())
    rates = null_rates(outcomes)
    assert rates[COMPARISON].n == 0 and rates[RUN_COMPARISON].n == 3 * 5


def test_single_draw_test_calls_equal_data_different_as_draws_grow():
    table = single_draw_rates(demo_like_design(600), AnalysisConfig(), [0.0, 0.04], 60,
                              progress=False)  # fmt: skip
    none, wide = table["task_rate"].tolist()
    assert none <= 0.06 and wide > 0.1, table


def _seeds_only(y, probs_a, probs_b, clusters=None, *, ci=0.95) -> PairedResult:
    """The old headline: a t-test over seeds in the deciding test's clothes."""
    res = seeded_paired_test(y, probs_a, probs_b, clusters, ci=ci)
    p = seed_ttest(res.seed_aurocs_a, res.seed_aurocs_b)["p"]
    return replace(res, p=float(p))


def test_switching_the_per_run_test_back_to_the_seed_ttest_fails_the_check(monkeypatch):
    monkeypatch.setattr(comparison, "seeded_paired_test", _seeds_only)
    outcomes = run_studies(
        demo_like_design(300),
        AnalysisConfig(alpha=ALPHA),
        QUICK,
        factors=False,
        progress=False,
        workers=1,
    )
    rate = null_rates(outcomes)[RUN_ALIGNMENT]
    assert _clearly_above_nominal(rate, ALPHA / 2), str(rate)


def test_power_grows_with_the_planted_difference():
    table = alignment_power(
        _replicated(n_test=800), AnalysisConfig(), [0.0, 0.12], [800], 24, progress=False
    )
    low, high = table["rate"].tolist()
    assert low <= 0.15 and high >= 0.7


def test_power_grows_with_replicates():
    table = power_by_replicates(_replicated(n_test=600), AnalysisConfig(), [0.06], [2, 5], 30,
                                progress=False)  # fmt: skip
    k2, k5 = table["rate"].tolist()
    assert k5 > k2 + 0.15 and k5 >= 0.4, table


def test_rate_interval_is_exact():
    r = Rate(5, 100)
    lo, hi = r.interval
    assert r.rate == 0.05 and lo == pytest.approx(0.01643, abs=1e-4)
    assert hi == pytest.approx(0.11284, abs=1e-4)
    assert np.isnan(Rate(0, 0).rate)


def test_design_matched_calibration_resamples_the_studys_patients():
    real = simulate_study(demo_like_design(150), 5)
    fm_sites = {"hospital": "hospital", "screening": "screening"}
    tasks = {"hospital_dr": "hospital", "screening_dr": "screening", "public_dr": "public"}
    design = design_from_predictions(real, fm_sites, tasks)
    assert [t.n_test for t in design.tasks] == [150, 150, 150]
    assert [t.n_classes for t in design.tasks] == [2, 2, 3] and design.seeds == 3
    fake = simulate_study(design, 0)
    assert set(fake) == set(real)
    assert set(fake[("hospital", "public_dr")]["y_true"]) <= {0, 1, 2}
    cal = calibrate_null(design, AnalysisConfig(), 12, progress=False)
    assert cal["n_studies"] == 12 and set(cal["headline"]) == {
        "data-level comparison (per study)",
        "aligned FM better (per study)",
        "per-run comparison",
        "any factor flagged",
    }
    assert all(t["resampled_from_study"] for t in cal["design"]["tasks"])


def test_each_decision_is_held_to_the_target_and_the_family_rate_is_reported(null_outcomes):
    from retfm.evaluation.calibration import judged

    rates = null_rates(null_outcomes)
    held = judged(rates)
    assert COMPARISON in held and ALIGNMENT_STUDY in held and ANY_FACTOR not in held
    assert "factor age flagged" in held and "factor sex changes the FM gap" in held
    assert SEED_TTEST not in held  # shown to explain the change, decides nothing
