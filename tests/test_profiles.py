"""Profiles and overrides rewrite params.yaml: mappings merge, an empty mapping clears."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from retfm.profiles import apply_overrides, apply_profile
from retfm.settings import SettingsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path / "params.yaml"


def test_an_empty_mapping_clears_and_comments_stay(params: Path) -> None:
    apply_overrides(params, {"synthetic": {"effects": {"alignment": {}}}})
    raw = yaml.safe_load(params.read_text())
    assert raw["synthetic"]["effects"]["alignment"] == {}
    assert raw["synthetic"]["effects"]["age_visibility"] > 0  # siblings kept
    assert "# every knob at 0" in params.read_text()


def test_the_no_effects_profile_sets_every_knob_to_zero(params: Path) -> None:
    apply_profile(params, ROOT / "profiles" / "no-effects.yaml")
    effects = yaml.safe_load(params.read_text())["synthetic"]["effects"]
    assert all(v in (0, 0.0, {}) for v in effects.values()), effects


def test_an_invalid_override_is_not_written(params: Path) -> None:
    before = params.read_text()
    with pytest.raises(SettingsError, match="cohort.images_per_site"):
        apply_overrides(params, {"cohort": {"images_per_site": -1}})
    assert params.read_text() == before
