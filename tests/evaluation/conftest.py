"""Simulated predictions with planted effects, shared by the evaluation tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest


def simulate(
    n_patients: int = 300,
    *,
    seed: int = 0,
    n_classes: int = 2,
    separation: float = 1.5,
    age_effect: float = 0.0,
    sex_effect: float = 0.0,
    fm_shift: float = 0.0,
    max_images: int = 2,
) -> pd.DataFrame:
    """One row per image. A patient's images share age, sex and a random effect.

    Class signal = ``separation`` - ``age_effect`` (if age >= 60) - ``sex_effect`` (if M)
    + ``fm_shift``: planted effects make a group's predictions worse, nothing else changes.
    """
    rng = np.random.default_rng(seed)
    per = rng.integers(1, max_images + 1, n_patients)
    pid = np.repeat(np.arange(n_patients), per)
    n = len(pid)
    age = rng.uniform(20, 90, n_patients)[pid]
    sex = rng.choice(["F", "M"], n_patients)[pid]
    eth = rng.choice(["white", "east_asian", "black"], n_patients)[pid]
    y = rng.integers(0, n_classes, n)
    signal = separation - age_effect * (age >= 60) - sex_effect * (sex == "M") + fm_shift
    logits = rng.normal(0, 1, (n, n_classes)) + 0.5 * rng.normal(0, 1, n_patients)[pid, None]
    logits[np.arange(n), y] += signal
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    frame = pd.DataFrame(
        {
            "image_id": [f"img{i:05d}" for i in range(n)],
            "patient_id": [f"pt{p:04d}" for p in pid],
            "y_true": y,
            "age": age,
            "sex": sex,
            "ethnicity": eth,
        }
    )
    for c in range(n_classes):
        frame[f"prob_{c}"] = probs[:, c]
    return frame


@pytest.fixture
def simulate_preds() -> Callable[..., pd.DataFrame]:
    return simulate
