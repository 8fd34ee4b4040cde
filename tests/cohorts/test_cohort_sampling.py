"""Behaviour of sample_cohort that the study relies on: whole patients, exact size, seeded draws."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from retfm.cohorts import CohortError, allocate, balance_report, sample_cohort

EDGES = [40.0, 60.0, 80.0]
PoolFactory = Callable[..., pd.DataFrame]


def draw(pool: pd.DataFrame, **kw):
    kw.setdefault("site", "hospital")
    kw.setdefault("size", 300)
    kw.setdefault("age_edges", EDGES)
    return sample_cohort(pool, **kw)


@pytest.mark.parametrize("strategy", ["random", "stratified"])
def test_exact_size_and_whole_patients(make_pool: PoolFactory, strategy: str) -> None:
    pool = make_pool(400)
    result = draw(pool, size=333, strategy=strategy)
    cohort = result.cohort
    assert len(cohort) == 333
    assert result.report["size"] == 333
    assert cohort["image_id"].is_unique
    assert set(cohort["image_id"]) <= set(pool["image_id"])
    # Every patient is whole, except at most one trimmed patient per stratum, whose unused
    # images are simply out of the cohort (never on another side).
    per_patient_cohort = cohort.groupby("patient_id").size()
    per_patient_pool = pool.groupby("patient_id").size()
    partial = per_patient_cohort[per_patient_cohort < per_patient_pool[per_patient_cohort.index]]
    n_strata = len(result.report["strata"])
    assert len(partial) <= n_strata
    assert result.report["chosen"]["trimmed_patients"] == len(partial)
    assert "age_band" in cohort.columns


def test_held_out_patients_never_in_cohort(make_pool: PoolFactory) -> None:
    pool = make_pool(300)
    held_out = set(pool["patient_id"].drop_duplicates().iloc[::3])
    result = draw(pool, size=250, exclude_patients=held_out)
    assert not set(result.cohort["patient_id"]) & held_out
    excluded = result.report["excluded"]
    assert excluded["patients_in_pool"] == len(held_out)
    assert excluded["images"] == int(pool["patient_id"].isin(held_out).sum())


def test_same_seed_same_cohort_even_when_rows_are_shuffled(make_pool: PoolFactory) -> None:
    pool = make_pool(300)
    shuffled = pool.sample(frac=1.0, random_state=7).reset_index(drop=True)
    a = draw(pool, seed=3, strategy="stratified")
    b = draw(shuffled, seed=3, strategy="stratified")
    assert a.cohort["image_id"].tolist() == b.cohort["image_id"].tolist()
    assert json.dumps(a.report["strata"]) == json.dumps(b.report["strata"])


def test_different_seed_or_site_gives_a_different_cohort(make_pool: PoolFactory) -> None:
    pool = make_pool(300)
    base = set(draw(pool, seed=0).cohort["image_id"])
    other_seed = set(draw(pool, seed=1).cohort["image_id"])
    other_site = set(draw(pool, seed=0, site="screening").cohort["image_id"])
    assert base != other_seed
    assert base != other_site


def test_stratified_keeps_the_pool_mix(make_pool: PoolFactory) -> None:
    pool = make_pool(600, age_mean=60, age_sd=18, female=0.3)
    result = draw(pool, size=500, strategy="stratified")
    pair = result.report["balance"]["pairs"][0]
    assert pair["b"] == "eligible_pool"
    assert pair["joint"]["max_abs_share_diff"] < 0.01
    assert abs(pair["smd"]["sex"]["smd"]) < 0.05
    pool_female = (pool["sex"] == "F").mean()
    assert abs((result.cohort["sex"] == "F").mean() - pool_female) < 0.01


def test_matched_aligns_two_different_sites_while_random_does_not(make_pool: PoolFactory) -> None:
    older = make_pool(700, seed=1, prefix="H", age_mean=66, age_sd=12, female=0.35)
    younger = make_pool(700, seed=2, prefix="S", age_mean=45, age_sd=12, female=0.65)
    pools = {"hospital": older, "screening": younger}
    smd: dict[str, float] = {}
    for strategy in ("random", "matched"):
        cohorts = {
            site: draw(pool, site=site, size=300, strategy=strategy, pools=pools).cohort
            for site, pool in pools.items()
        }
        assert {len(c) for c in cohorts.values()} == {300}
        report = balance_report(cohorts, ["age_band", "sex"], EDGES)
        pair = report["pairs"][0]
        smd[strategy] = max(abs(pair["smd"]["age_band"]["smd"]), abs(pair["smd"]["sex"]["smd"]))
    assert smd["matched"] < 0.1
    assert smd["random"] > 0.3


def test_matched_target_is_the_same_for_every_site(make_pool: PoolFactory) -> None:
    a = make_pool(400, seed=1, prefix="A", age_mean=65)
    b = make_pool(400, seed=2, prefix="B", age_mean=45)
    pools = {"a": a, "b": b}
    ra = draw(a, site="a", size=200, strategy="matched", pools=pools, exclude_patients={"A00001"})
    rb = draw(b, site="b", size=200, strategy="matched", pools=pools)
    assert ra.report["matched"]["target_share"] == rb.report["matched"]["target_share"]


def test_too_few_images_names_the_counts(make_pool: PoolFactory) -> None:
    pool = make_pool(50)
    held_out = set(pool["patient_id"].iloc[:10])
    with pytest.raises(CohortError) as err:
        draw(pool, size=10_000, exclude_patients=held_out, per_patient_cap=2)
    message = str(err.value)
    eligible = draw(pool, size=1, exclude_patients=held_out, per_patient_cap=2).report["eligible"]
    assert f"only {eligible['images']} are eligible" in message
    assert "10000" in message
    assert f"excluding {pool['patient_id'].iloc[:10].nunique()} held-out" in message
    assert "cohort.allow_smaller: true" in message


def test_allow_smaller_takes_every_eligible_image(make_pool: PoolFactory) -> None:
    pool = make_pool(50)
    result = draw(pool, size=10_000, allow_smaller=True, per_patient_cap=2)
    assert result.report["shrunk"] is True
    assert len(result.cohort) == result.report["eligible"]["images"] < 10_000
    assert result.cohort.groupby("patient_id").size().max() <= 2


def test_matched_shortage_fails_or_shrinks_keeping_the_mix(make_pool: PoolFactory) -> None:
    a = make_pool(300, seed=1, prefix="A", age_mean=70, age_sd=8)
    b = make_pool(300, seed=2, prefix="B", age_mean=35, age_sd=8)
    pools = {"a": a, "b": b}
    with pytest.raises(CohortError, match="matched mix"):
        draw(a, site="a", size=500, strategy="matched", pools=pools)
    result = draw(a, site="a", size=500, strategy="matched", pools=pools, allow_smaller=True)
    assert result.report["shrunk"] is True
    assert 0 < len(result.cohort) < 500
    for row in result.report["strata"]:
        assert row["chosen_images"] <= row["eligible_images"]


def test_per_patient_cap_is_respected_and_seeded(make_pool: PoolFactory) -> None:
    pool = make_pool(200, max_images=6)
    a = draw(pool, size=150, per_patient_cap=2, seed=5)
    b = draw(pool.iloc[::-1], size=150, per_patient_cap=2, seed=5)
    assert a.cohort.groupby("patient_id").size().max() <= 2
    assert a.cohort["image_id"].tolist() == b.cohort["image_id"].tolist()
    assert a.report["capped_images"] == int(
        (pool.groupby("patient_id").size() - 2).clip(lower=0).sum()
    )


def test_bad_input_errors_name_the_problem(make_pool: PoolFactory) -> None:
    pool = make_pool(30)
    dup = pd.concat([pool, pool.iloc[[3]].assign(row=999)], ignore_index=True)
    with pytest.raises(CohortError, match=r"image_id.*unique.*999"):
        draw(dup, size=5)
    with pytest.raises(CohortError, match="no column 'camera_model'"):
        draw(pool, size=5, strategy="stratified", balance_on=["camera_model"])
    with pytest.raises(CohortError, match="continuous"):
        draw(pool, size=5, strategy="stratified", balance_on=["age"])
    with pytest.raises(CohortError, match="needs `pools`"):
        draw(pool, size=5, strategy="matched")
    with pytest.raises(CohortError, match="cohort.strategy"):
        draw(pool, size=5, strategy="clustered")


def test_report_is_json_serialisable(make_pool: PoolFactory) -> None:
    result = draw(make_pool(100), size=80, strategy="stratified")
    assert json.loads(json.dumps(result.report, allow_nan=False))["requested"] == 80


@pytest.mark.parametrize(
    ("total", "shares"), [(10, [0.5, 0.3, 0.2]), (7, [1, 1, 1]), (100, [0.333, 0.333, 0.334])]
)
def test_allocate_sums_to_total_and_is_proportional(total: int, shares: list[float]) -> None:
    out = allocate(total, np.array(shares, dtype=float))
    assert out.sum() == total
    exact = total * np.array(shares) / sum(shares)
    assert np.all(np.abs(out - exact) < 1.0)
