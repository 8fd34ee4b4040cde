"""The study finds what the synthetic data plants, and nothing else (profiles/recovery.yaml).

The demo plants an age effect (``age_visibility``) and an alignment effect (``alignment:
{hospital: 1.0}``); this end-to-end run at a small size checks that the study's own decisions
find both where they were planted: age flagged, sex and ethnicity not; the aligned FM better on
hospital_dr, no evidence on screening_dr. ``benchmarks/bench_recovery.py`` checks the demo at
full size, and that with every knob at 0 it flags nothing.
"""

from __future__ import annotations

import json
import shutil

import pytest

from retfm.reporting.summary import factor_verdicts

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def recovered(tmp_path_factory, clone, sh):  # noqa: ANN001, ANN201
    repo = clone(tmp_path_factory.mktemp("recovery"), profile="recovery")
    sh(["retfm", "synth"], repo)
    sh(["dvc", "add", "-q", "data"], repo)
    sh(["dvc", "repro"], repo)
    summary = json.loads((repo / "outputs/study/summary.json").read_text())
    yield summary
    shutil.rmtree(repo, ignore_errors=True)


def test_the_planted_age_effect_is_found_and_sex_and_ethnicity_are_not(recovered) -> None:  # noqa: ANN001
    verdicts = factor_verdicts(recovered["factors"])
    assert verdicts["age"] == "effect", recovered["factors"]
    assert verdicts["sex"] != "effect" and verdicts["ethnicity"] != "effect", verdicts


def test_the_planted_alignment_effect_is_found_where_planted_only(recovered) -> None:  # noqa: ANN001
    alignment = {t["task"]: t["alignment"] for t in recovered["tasks"] if t["alignment"]}
    assert alignment == {"hospital_dr": "better", "screening_dr": "no evidence"}, alignment
    assert recovered["alignment"]["better_tasks"] == ["hospital_dr"]
