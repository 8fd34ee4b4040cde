import numpy as np
import pandas as pd
import pytest

from retfm.data.schema import age_band
from retfm.validation import suites
from retfm.validation.runner import SuiteRunner, run_site_suite


def _site(n: int = 12) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "row": np.arange(2, n + 2),
            "image_id": [f"i{i}" for i in range(n)],
            "patient_id": [f"p{i // 2}" for i in range(n)],
            "path": [f"images/i{i}.png" for i in range(n)],
            "age": np.linspace(20, 90, n),
            "sex": ["F", "M"] * (n // 2),
            "ethnicity": ["white", "east_asian", "unknown"] * (n // 3),
            "eye": ["L", "R", "unknown"] * (n // 3),
        }
    )


def _task(n: int = 12) -> pd.DataFrame:
    df = _site(n).drop(columns=["ethnicity", "eye"])
    df["patient_id"] = [f"p{i}" for i in range(n)]
    df["label"] = ["0", "1"] * (n // 2)
    df["split"] = ["train", "train", "val", "test"] * (n // 4)
    df["source_site"] = "public"
    return suites.with_split_leakage(df)


def _failed(result) -> dict:
    return {(f.expectation, f.column): f for f in result.failures}


def test_valid_site_table_passes(settings):
    result = run_site_suite(_site(), settings)
    assert result.success, result.failures
    assert result.evaluated > 15 and result.rows == 12


def test_site_rules_name_the_offending_rows(settings):
    df = _site()
    df.loc[1, "age"] = 130.0
    df.loc[2, "sex"] = "X"
    df.loc[3, "image_id"] = "i0"
    df.loc[4, "path"] = "../escape.png"
    df.loc[5, "ethnicity"] = "martian"
    df.loc[6, "patient_id"] = None
    result = run_site_suite(df, settings)
    assert not result.success
    failed = _failed(result)
    assert failed["expect_column_values_to_be_between", "age"].rows == [3]
    assert failed["expect_column_values_to_be_between", "age"].values == [130.0]
    assert failed["expect_column_values_to_be_in_set", "sex"].rows == [4]
    unique = failed["expect_column_values_to_be_unique", "image_id"]
    assert (unique.count, unique.rows) == (2, [2, 5])
    assert unique.files == ["images/i0.png", "images/i3.png"]
    assert failed["expect_column_values_to_not_match_regex", "path"].values == ["../escape.png"]
    assert failed["expect_column_values_to_be_in_set", "ethnicity"].rows == [7]
    assert failed["expect_column_values_to_not_be_null", "patient_id"].count == 1
    assert len(failed) == 6


def test_wrong_types_and_missing_columns_fail(settings):
    df = _site().drop(columns=["sex"])
    df["age"] = df["age"].astype(str)
    failed = _failed(run_site_suite(df, settings))
    assert ("expect_column_to_exist", "sex") in failed
    assert ("expect_column_values_to_be_of_type", "age") in failed


def test_valid_task_table_passes(settings):
    runner = SuiteRunner()
    suite = suites.task_suite(
        settings, ["0", "1"], "task.ok", optional=["age", "sex"], images=False
    )
    result = runner.run("t.csv", _task(), suite)
    assert result.success, result.failures


def test_task_rules_split_leak_labels_sites(settings):
    df = _task()
    df.loc[0, "patient_id"] = df.loc[2, "patient_id"]  # a train patient also in val
    df.loc[10, "label"] = "2"  # a val label the train split does not have
    df.loc[6, "source_site"] = "elsewhere"
    df = suites.with_split_leakage(df.drop(columns=suites.SEVERAL_SPLITS))
    df = df[df["split"] != "test"]
    classes = suites.task_classes(df)
    assert classes == ["0", "1"]
    result = SuiteRunner().run(
        "t.csv", df, suites.task_suite(settings, classes, "task.bad", images=False)
    )
    failed = _failed(result)
    assert failed["expect_column_values_to_be_in_set", suites.SEVERAL_SPLITS].rows == [2, 4]
    assert failed["expect_column_values_to_be_in_set", "label"].values == ["2"]
    assert failed["expect_column_values_to_be_in_set", "source_site"].rows == [8]
    split = failed["expect_column_distinct_values_to_contain_set", "split"]
    assert "test" in split.detail
    assert len(failed) == 4


def test_cohort_rules_heldout_patients_and_mix(settings):
    pool = _site(300)
    cohort = pool.iloc[np.r_[0:300:4, 1:300:4]].reset_index(drop=True)  # same age/sex mix
    flagged = suites.with_heldout_flag(cohort, {"p0", "p1"})
    runner = SuiteRunner()
    result = runner.run("cohort", flagged, suites.cohort_suite(settings, "cohort.x"))
    assert _failed(result)["expect_column_values_to_be_in_set", suites.IN_HELDOUT].rows == [2, 3]

    mix = suites.mix_table(cohort, pool, settings)
    ok = runner.run("mix", mix, suites.mix_suite(settings, "mix.ok"), index_columns=["group"])
    assert ok.success
    old = pool[pool["age"] >= 60]
    skewed = suites.mix_table(old, pool, settings)
    bad = runner.run("mix", skewed, suites.mix_suite(settings, "mix.bad"), index_columns=["group"])
    failure = _failed(bad)["expect_column_values_to_be_between", "abs_difference"]
    assert sorted(failure.rows) == ["age_band=<60", "age_band=>=60"]


@pytest.mark.parametrize("edges", [[60.0], [40.0, 60.0, 80.0], []])
def test_age_bands_match_the_schema(edges):
    ages = pd.Series([0.0, 39.9, 40.0, 59.0, 60.0, 79.5, 80.0, 101.0, np.nan])
    expected = [age_band(a, edges) for a in ages]
    assert suites.age_bands(ages, edges).tolist() == expected
