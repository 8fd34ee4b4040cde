"""params.yaml -> typed, frozen settings; mistakes name their key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from retfm.profiles import apply_profile
from retfm.settings import SettingsError, load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[1]


def _raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_load_and_are_frozen() -> None:
    settings = load_settings(ROOT / "params.yaml")
    assert settings.model.arch.img_size == settings.pack.image_size
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type varies
        settings.cohort.images_per_site = 1  # type: ignore[misc]


def test_unknown_key_is_named() -> None:
    raw = _raw()
    raw["cohort"]["szie"] = 10
    with pytest.raises(SettingsError, match=r"cohort\.szie: unknown key"):
        parse_settings(raw)


def test_mistyped_value_is_named() -> None:
    raw = _raw()
    raw["pretrain"]["epochs"] = "many"
    with pytest.raises(SettingsError, match=r"pretrain\.epochs"):
        parse_settings(raw)


def test_cross_field_rules() -> None:
    raw = _raw()
    raw["pack"]["image_size"] = 48
    with pytest.raises(SettingsError, match="must equal the model preset"):
        parse_settings(raw)
    raw = _raw()
    raw["model"]["preset"] = "huge"
    with pytest.raises(SettingsError, match="not one of"):
        parse_settings(raw)


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no such settings file"):
        load_settings(tmp_path / "params.yaml")


def test_digest_is_stable_and_section_specific() -> None:
    a = parse_settings(_raw())
    raw = _raw()
    raw["adapt"]["epochs"] = 99
    b = parse_settings(raw)
    assert a.digest("pretrain", "model") == b.digest("pretrain", "model")
    assert a.digest() != b.digest()


@pytest.mark.parametrize("profile", ["tiny", "paper"])
def test_profiles_apply_and_validate(profile: str, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    apply_profile(params, ROOT / "profiles" / f"{profile}.yaml")
    settings = load_settings(params)
    assert settings.profile == profile
    assert "# Every knob of the study" in params.read_text()  # comments kept


def test_invalid_profile_is_refused_and_file_untouched(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text()
    params.write_text(original)
    bad = tmp_path / "bad.yaml"
    bad.write_text("pack:\n  image_size: 17\n")
    with pytest.raises(SettingsError):
        apply_profile(params, bad)
    assert params.read_text() == original
