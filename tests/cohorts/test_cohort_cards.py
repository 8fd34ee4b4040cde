"""Data cards: content computed from the cohort and real image files, and the files written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retfm.cohorts import build_card, sample_cohort, write_card

PoolFactory = Callable[..., pd.DataFrame]


def _write_images(root: Path, paths: pd.Series, side: int = 48) -> None:
    """Real PNGs: a bright disc on black whose blur varies, so quality statistics vary."""
    yy, xx = np.mgrid[:side, :side]
    disc = ((yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 2.5) ** 2).astype(np.float32)
    rng = np.random.default_rng(0)
    for rel in paths:
        img = (disc * 150 + rng.normal(0, 20, disc.shape) * disc).clip(0, 255).astype(np.uint8)
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([img, img // 2, img // 4], axis=-1)).save(target)


@pytest.fixture
def card_inputs(make_pool: PoolFactory, tmp_path: Path):
    pool = make_pool(60, seed=3)
    result = sample_cohort(pool, site="hospital", size=100, seed=0, age_edges=[40, 60, 80])
    root = tmp_path / "site"
    _write_images(root, result.cohort["path"].iloc[1:])  # the first image is missing on purpose
    return result, root


def test_card_content_matches_the_cohort(card_inputs) -> None:
    result, root = card_inputs
    cohort = result.cohort
    card = build_card(
        cohort,
        site="hospital",
        report=result.report,
        data_hash="abc123",
        settings_snapshot={"size": 100, "strategy": "random"},
        image_root=root,
        image_sample=30,
    )
    json.dumps(card, allow_nan=False)  # strictly JSON-serialisable
    assert card["site"] == "hospital"
    assert card["size"]["images"] == 100
    assert card["size"]["patients"] == cohort["patient_id"].nunique()
    assert sum(card["age"]["histogram"]["counts"]) == cohort["age"].notna().sum()
    assert sum(card["age"]["bands"].values()) == 100
    assert card["distributions"]["sex"]["counts"] == cohort["sex"].value_counts().to_dict()
    diag = cohort["diagnosis"].str.strip()
    known = diag != ""
    assert card["disease"]["known"] == int(known.sum())
    assert card["disease"]["diseased"] == int((known & (diag.str.lower() != "normal")).sum())
    images = card["images"]
    assert images["sampled"] == 30
    assert images["readable"] + images["unreadable"]["count"] == 30
    assert images["width"]["mean"] == 48.0
    assert 0 < images["brightness"]["mean"] < 255
    assert images["sharpness"]["mean"] > 0
    assert card["data"]["dvc_hash"] == "abc123"
    assert card["sampling"]["report"]["requested"] == 100


def test_card_image_sample_is_seeded(card_inputs) -> None:
    result, root = card_inputs
    kw = dict(
        site="hospital",
        report=result.report,
        data_hash="h",
        settings_snapshot={},
        image_root=root,
        image_sample=20,
    )
    a = build_card(result.cohort, seed=1, **kw)["images"]
    b = build_card(result.cohort.iloc[::-1], seed=1, **kw)["images"]
    assert a["brightness"] == b["brightness"]
    assert a["unreadable"] == b["unreadable"]


def test_grades_count_as_disease_when_above_zero(make_pool: PoolFactory) -> None:
    pool = make_pool(6, max_images=1)
    pool["diagnosis"] = ["0", "2", "", "Normal ", "glaucoma", " none"]
    card = build_card(
        pool,
        site="s",
        report={},
        data_hash="h",
        settings_snapshot={},
        image_root=Path("."),
        image_sample=0,
    )
    disease = card["disease"]
    assert (disease["known"], disease["unknown"], disease["diseased"]) == (5, 1, 2)
    assert disease["prevalence"] == 0.4  # "none" (the built-in data's word) is healthy
    assert card["images"] is None


def test_write_card_writes_json_markdown_and_plots(card_inputs, tmp_path: Path) -> None:
    result, root = card_inputs
    card = build_card(
        result.cohort,
        site="hospital",
        report=result.report,
        data_hash="abc123",
        settings_snapshot={"size": 100},
        image_root=root,
        image_sample=10,
    )
    out = tmp_path / "card"
    written = write_card(card, out)
    assert {
        "card.json",
        "card.md",
        "age_hist.png",
        "sex.png",
        "ethnicity.png",
        "camera.png",
    } <= set(written)
    assert json.loads((out / "card.json").read_text())["site"] == "hospital"
    markdown = (out / "card.md").read_text()
    assert "](age_hist.png)" in markdown and "](sex.png)" in markdown
    assert "abc123" in markdown
    for name, path in written.items():
        assert path.parent == out and path.stat().st_size > 0
        if name.endswith(".png"):
            with Image.open(path) as img:
                assert img.format == "PNG" and min(img.size) > 100
