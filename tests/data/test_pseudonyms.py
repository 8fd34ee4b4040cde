"""Pseudonymised patient keys (retfm.data.pseudonyms): keyed, deterministic, checked."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from retfm.data import pseudonyms
from retfm.data.pseudonyms import PseudonymError, load_key, pseudonym, pseudonymise

KEY = "ab" * 32


def test_env_key_missing_names_the_variable_and_how_to_make_one() -> None:
    with pytest.raises(PseudonymError) as info:
        load_key("env:SITE_KEY", env={})
    text = str(info.value)
    assert "privacy.pseudonym_key: env:SITE_KEY" in text and "SITE_KEY is not set" in text
    assert "secrets.token_hex(32)" in text and "export SITE_KEY=" in text


@pytest.mark.parametrize("bad", ["abc", "zz" * 20, ""])
def test_short_or_non_hex_keys_are_refused(bad: str, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(PseudonymError, match="at least 32 hex digits"):
        load_key("env:K", env={"K": bad} if bad else {"K": " "})
    (tmp_path / "k").write_text(bad)
    with pytest.raises(PseudonymError, match="at least 32 hex digits"):
        load_key(f"file:{tmp_path / 'k'}")


def test_file_and_env_keys_agree_and_missing_file_is_named(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "site.key").write_text(KEY + "\n# a comment line\n")
    from_file = load_key("file:site.key", root=tmp_path)
    from_env = load_key("env:K", env={"K": KEY})
    assert from_file.secret == from_env.secret == bytes.fromhex(KEY)
    assert from_file.key_id == from_env.key_id and KEY not in from_file.key_id
    with pytest.raises(PseudonymError, match=r"no key file at .*other\.key"):
        load_key("file:other.key", root=tmp_path)
    with pytest.raises(PseudonymError, match="expected 'env:<VARIABLE>'"):
        load_key("plain-text-key")


def test_pseudonyms_are_keyed_deterministic_and_match_hmac_sha256() -> None:
    import hashlib
    import hmac

    key = load_key("env:K", env={"K": KEY})
    other = load_key("env:K", env={"K": "cd" * 32})
    expected = hmac.new(bytes.fromhex(KEY), b"MRN-0042", hashlib.sha256).hexdigest()[:16]
    assert pseudonym(key, "MRN-0042") == "pt-" + expected == pseudonym(key, "MRN-0042")
    assert pseudonym(other, "MRN-0042") != pseudonym(key, "MRN-0042")
    assert key.key_id != other.key_id


def test_one_patient_gets_one_pseudonym_across_tables() -> None:
    key = load_key("env:K", env={"K": KEY})
    pool = pd.DataFrame({"image_id": ["a", "b", "c"], "patient_id": ["MRN1", "MRN1", "MRN2"]})
    task = pd.DataFrame({"image_id": ["t"], "patient_id": ["MRN2"], "label": ["1"]})
    out = pseudonymise({"pool.csv": pool, "task.csv": task}, key)
    assert out["pool.csv"]["patient_id"].iloc[0] == out["pool.csv"]["patient_id"].iloc[1]
    assert out["pool.csv"]["patient_id"].iloc[2] == out["task.csv"]["patient_id"].iloc[0]
    assert out["pool.csv"]["patient_id"].nunique() == 2
    assert not out["pool.csv"]["patient_id"].str.contains("MRN").any()
    assert pool["patient_id"].tolist() == ["MRN1", "MRN1", "MRN2"]  # the input is untouched


def test_the_public_synthetic_key_is_refused_on_real_looking_ids() -> None:
    key = load_key("synthetic")
    fine = pd.DataFrame({"patient_id": ["hospital-P000001", "public_dr-P123456"]})
    assert pseudonymise({"a.csv": fine}, key)["a.csv"]["patient_id"].str.startswith("pt-").all()
    real = pd.DataFrame({"patient_id": ["hospital-P000001", "hospital-P000002", "MRN 0042"]})
    with pytest.raises(PseudonymError) as info:
        pseudonymise({"data/sites/x/metadata.csv": real}, key)
    text = str(info.value)
    assert "data/sites/x/metadata.csv, row 4 (field patient_id)" in text
    assert "public key" in text and "env:RETFM_PSEUDONYM_KEY" in text


def test_a_collision_stops_rather_than_merging_two_patients(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(pseudonyms, "pseudonym", lambda key, pid: "pt-0000000000000000")
    key = load_key("env:K", env={"K": KEY})
    with pytest.raises(PseudonymError, match="share a pseudonym"):
        pseudonymise({"a": pd.DataFrame({"patient_id": ["x", "y"]})}, key)


def test_the_record_names_the_method_and_fingerprint_never_the_key(tmp_path) -> None:  # noqa: ANN001
    key = load_key("env:K", env={"K": KEY})
    pseudonyms.write_record(key, tmp_path / "pseudonyms.json", 7)
    record = json.loads((tmp_path / "pseudonyms.json").read_text())
    assert record == {"method": pseudonyms.METHOD, "key": "env:K", "key_id": key.key_id,
                      "patients": 7}  # fmt: skip
    assert KEY not in (tmp_path / "pseudonyms.json").read_text()
