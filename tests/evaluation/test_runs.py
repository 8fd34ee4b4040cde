"""One run's evaluation as the evaluate stage uses it: settings in, keys and tables out."""

from __future__ import annotations

import numpy as np
import pandas as pd

from retfm.evaluation.runs import evaluate_predictions, groupings
from retfm.settings import EvaluationSettings


def _preds(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25, n), 0.01, 0.99)
    return pd.DataFrame(
        {
            "image_id": [f"i{i}" for i in range(n)],
            "patient_id": [f"p{i // 2}" for i in range(n)],
            "y_true": y,
            "prob_0": 1 - p1,
            "prob_1": p1,
            "age": rng.uniform(20, 90, n).round(1),
            "sex": rng.choice(["F", "M"], n),
        }
    )


def test_groupings_follow_settings_and_available_columns() -> None:
    cfg = EvaluationSettings(intersections=["age*sex", "age*ethnicity"])
    names = groupings(cfg, _preds())
    assert names == ["age", "age_fine", "sex", "age*sex"]  # no ethnicity column: not asked


def test_evaluate_predictions_gives_keys_tables_and_intervals() -> None:
    cfg = EvaluationSettings(intersections=["age*sex"], n_boot=50, min_group_size=10)
    result = evaluate_predictions(_preds(), cfg)
    keys = result.keys.metrics
    assert 0.5 < keys["auroc"] <= 1.0
    assert "auroc/age/lt60" in keys and "n/sex/F" in keys and "gap/auroc/age" in keys
    assert any(k.startswith("auroc/age_x_sex/") for k in keys)
    assert {"auroc_lo", "auroc_hi"} <= set(result.groups.columns)
    ok = result.groups[result.groups["defined"]]
    assert (ok["auroc_lo"] <= ok["auroc"] + 1e-9).all() and (
        ok["auroc"] <= ok["auroc_hi"] + 1e-9
    ).all()
