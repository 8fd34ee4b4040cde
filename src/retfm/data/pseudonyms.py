"""Pseudonymised patient keys: what leaves the validate stage never names a patient in clear.

Every table downstream of validation (cohorts, packed sets, predictions, evaluation tables,
and so everything a team pushes to a DVC remote or logs to MLflow) carries ``pt-`` followed by
16 hex digits of HMAC-SHA256(key, patient_id) instead of the hospital's identifier. A keyed
hash, not a plain one: a plain hash of a medical record number is reversed by hashing every
possible number, a keyed one only by whoever holds the key. The mapping is deterministic, so
grouping (patient-level splits, cohort sampling, the patient bootstrap) is unchanged, and it is
the same for every table of a study: a patient in a site pool and in a held-out task set gets
the same pseudonym, which is how the cohort stage keeps held-out patients out.

The key stays at the site (``privacy.pseudonym_key`` names where it is, never the key itself):

- ``env:NAME``: the key is the environment variable ``NAME`` (hex, at least 32 digits);
- ``file:PATH``: the key is the first line of a file kept outside git and DVC;
- ``synthetic``: a public key, for the built-in synthetic data only (anyone can reverse it by
  trying ids). It is refused on tables whose ids do not look synthetic (``<site>-P000123``).

64 bits make a collision between two patients of a million-patient archive a 1-in-30-million
event; :func:`pseudonymise` checks anyway and stops rather than merge two patients.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from retfm.settings import KEY_SPEC

PREFIX = "pt-"
DIGITS = 16
METHOD = f"HMAC-SHA256(key, patient_id), first {DIGITS} hex digits, prefixed {PREFIX!r}"
#: The public key of ``synthetic`` (not a secret: the built-in data has no real patients).
SYNTHETIC_KEY = hashlib.sha256(b"retfm synthetic data: no real patients").digest()
SYNTHETIC_ID = re.compile(r"^[A-Za-z0-9_.]+-P\d{6}$")
MIN_KEY_HEX = 32
SPEC = re.compile(KEY_SPEC)  # the pattern params.yaml is checked against
NEW_KEY_HINT = (
    "make one with  python -c 'import secrets; print(secrets.token_hex(32))'  and keep it at "
    "the site (a password manager, the site's secret store), never in git or a DVC remote"
)


class PseudonymError(ValueError):
    """The key cannot be read, or the ids cannot be pseudonymised safely."""


@dataclass(frozen=True)
class PseudonymKey:
    spec: str  # where the key came from (safe to record)
    secret: bytes

    @property
    def key_id(self) -> str:
        """A fingerprint of the key (safe to record): tells two runs' keys apart."""
        return hmac.new(self.secret, b"retfm key id", hashlib.sha256).hexdigest()[:12]

    @property
    def is_synthetic(self) -> bool:
        return self.spec == "synthetic"

    def record(self) -> dict[str, str]:
        return {"method": METHOD, "key": self.spec, "key_id": self.key_id}


def load_key(
    spec: str, *, root: Path = Path("."), env: Mapping[str, str] | None = None
) -> PseudonymKey:
    """Read the key named by ``privacy.pseudonym_key`` (see the module docstring)."""
    env = os.environ if env is None else env
    where = f"privacy.pseudonym_key: {spec}"
    if not SPEC.match(spec):
        raise PseudonymError(f"{where}: expected 'env:<VARIABLE>', 'file:<path>' or 'synthetic'")
    if spec == "synthetic":
        return PseudonymKey(spec, SYNTHETIC_KEY)
    kind, _, name = spec.partition(":")
    if kind == "env":
        if not env.get(name):
            raise PseudonymError(
                f"{where}: the environment variable {name} is not set. It holds the site's key "
                f"for pseudonymising patient ids; {NEW_KEY_HINT}, then  export {name}=<key>"
            )
        text, source = env[name], f"${name}"
    else:
        path = Path(name) if Path(name).is_absolute() else root / name
        if not path.is_file():
            raise PseudonymError(f"{where}: no key file at {path}; {NEW_KEY_HINT}")
        lines = path.read_text().splitlines()
        text, source = (lines[0] if lines else ""), str(path)
    text = text.strip()
    if len(text) < MIN_KEY_HEX or not re.fullmatch(r"[0-9a-fA-F]+", text):
        raise PseudonymError(
            f"{where}: the key in {source} must be at least {MIN_KEY_HEX} hex digits "
            f"({len(text)} characters found); {NEW_KEY_HINT}"
        )
    return PseudonymKey(spec, bytes.fromhex(text if len(text) % 2 == 0 else "0" + text))


def pseudonym(key: PseudonymKey, patient_id: str) -> str:
    digest = hmac.new(key.secret, str(patient_id).encode(), hashlib.sha256).hexdigest()
    return PREFIX + digest[:DIGITS]


def pseudonymise(tables: Mapping[str, pd.DataFrame], key: PseudonymKey) -> dict[str, pd.DataFrame]:
    """The tables with ``patient_id`` replaced by its pseudonym (same key for all of them).

    Raises :class:`PseudonymError` naming the table and row when the public ``synthetic`` key
    meets an id that does not look synthetic, or when two ids share a pseudonym.
    """
    ids = pd.unique(pd.concat([t["patient_id"].astype(str) for t in tables.values()]))
    if key.is_synthetic:
        for name, table in tables.items():
            bad = ~table["patient_id"].astype(str).str.match(SYNTHETIC_ID.pattern)
            if bad.any():
                row = int(bad.to_numpy().argmax())
                raise PseudonymError(
                    f"{name}, row {row + 2} (field patient_id): privacy.pseudonym_key: synthetic "
                    "is a public key, for the built-in synthetic data (ids like "
                    f"'hospital-P000123'); this id does not look synthetic. Set "
                    "privacy.pseudonym_key: env:RETFM_PSEUDONYM_KEY (or file:<path>) in "
                    f"params.yaml; {NEW_KEY_HINT}"
                )
    mapping = {pid: pseudonym(key, pid) for pid in ids}
    if len(set(mapping.values())) != len(mapping):
        raise PseudonymError(
            f"two of {len(mapping)} patient ids share a pseudonym under key {key.key_id}; "
            "use another key (a collision merges two patients)"
        )
    out = {}
    for name, table in tables.items():
        table = table.copy()
        table["patient_id"] = table["patient_id"].astype(str).map(mapping)
        out[name] = table
    return out


def write_record(key: PseudonymKey, path: Path, patients: int) -> None:
    """``pseudonyms.json``: how ids were pseudonymised and the key's fingerprint (no key, no
    mapping), so a rerun under another key is visible in ``dvc diff``."""
    path.write_text(json.dumps({**key.record(), "patients": patients}, indent=2) + "\n")
