import numpy as np
import pandas as pd
import pytest

from retfm.evaluation.subgroups import add_groups, check_predictions, group_column, group_sort_key

BINS = {"age": [60.0], "age_fine": [40.0, 60.0, 80.0]}


def test_add_groups_bands_keep_raw_age(simulate_preds):
    preds = simulate_preds(50)
    out = add_groups(preds, BINS, intersections=["age*sex"])
    assert out["age"].equals(preds["age"])  # raw years untouched
    assert set(out[group_column("age")]) == {"<60", ">=60"}
    assert set(out[group_column("age_fine")]) <= {"<40", "40-59", "60-79", "80+"}
    row = out.iloc[0]
    assert row[group_column("age*sex")] == f"{row[group_column('age')]} & {row['sex']}"
    assert (out.loc[out["age"] >= 60, group_column("age")] == ">=60").all()


def test_missing_metadata_becomes_unknown(simulate_preds):
    preds = simulate_preds(20)
    preds.loc[0, "age"] = np.nan
    preds.loc[1, "sex"] = None
    out = add_groups(preds, BINS)
    assert out.loc[0, group_column("age")] == "unknown"
    assert out.loc[1, group_column("sex")] == "unknown"


def test_natural_group_order():
    labels = ["80+", "unknown", "<40", "60-79", "40-59"]
    assert sorted(labels, key=group_sort_key) == ["<40", "40-59", "60-79", "80+", "unknown"]


def test_unknown_intersection_factor_is_an_error(simulate_preds):
    with pytest.raises(ValueError, match="intersection 'age\\*camera'"):
        add_groups(simulate_preds(10), BINS, intersections=["age*camera"])


def test_bad_predictions_name_image_and_field(simulate_preds):
    preds = simulate_preds(10)
    preds.loc[3, "prob_0"] = 0.9  # row no longer sums to 1
    with pytest.raises(ValueError, match=r"row 3 \(image_id 'img00003'\)"):
        check_predictions(preds)
    with pytest.raises(ValueError, match="missing required column"):
        check_predictions(preds.drop(columns="patient_id"))
    dup = pd.concat([simulate_preds(5), simulate_preds(5).iloc[:1]])
    with pytest.raises(ValueError, match="appears more than once"):
        check_predictions(dup)
