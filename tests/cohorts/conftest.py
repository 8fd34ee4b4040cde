"""Small synthetic site pools, built the way a normalised metadata table looks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

PoolFactory = Callable[..., pd.DataFrame]


def build_pool(
    n_patients: int = 400,
    *,
    seed: int = 0,
    prefix: str = "P",
    age_mean: float = 55.0,
    age_sd: float = 15.0,
    female: float = 0.5,
    max_images: int = 4,
    ethnicity: tuple[str, ...] = ("white", "east_asian", "black", "south_asian"),
) -> pd.DataFrame:
    """A pool of ``n_patients`` patients with 1..``max_images`` images each (same age and sex)."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, max_images + 1, size=n_patients)
    pid = np.repeat(np.arange(n_patients), per_patient)
    age = np.clip(rng.normal(age_mean, age_sd, n_patients), 18, 95).round(1)
    sex = np.where(rng.random(n_patients) < female, "F", "M")
    eth = rng.choice(np.array(ethnicity), size=n_patients)
    n = len(pid)
    within = np.arange(n) - np.repeat(np.cumsum(per_patient) - per_patient, per_patient)
    patient_ids = np.char.add(f"{prefix}", np.char.zfill(pid.astype(str), 5))
    image_ids = np.char.add(np.char.add(patient_ids, "_"), within.astype(str))
    return pd.DataFrame(
        {
            "image_id": image_ids,
            "patient_id": patient_ids,
            "path": np.char.add(np.char.add("images/", image_ids), ".png"),
            "age": age[pid],
            "sex": sex[pid],
            "ethnicity": eth[pid],
            "eye": np.where(within % 2 == 0, "L", "R"),
            "camera": rng.choice(np.array(["topcon", "canon"]), size=n),
            "diagnosis": rng.choice(np.array(["normal", "dr", "amd", ""]), size=n),
            "row": np.arange(2, n + 2),
        }
    )


@pytest.fixture
def make_pool() -> PoolFactory:
    """The pool builder, as a fixture (tests import nothing from conftest)."""
    return build_pool
