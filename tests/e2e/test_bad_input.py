"""Bad data stops `dvc repro` at validation, names file, column and rows, and nothing is trained
or registered."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SITE_CSV = "data/sites/hospital/metadata.csv"


def _rewrite(repo: Path, edit) -> None:  # noqa: ANN001 - edit(rows) mutates the list of dicts
    path = repo / SITE_CSV
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    fields = edit(rows) or list(rows[0].keys())
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def drop_age(repo: Path) -> None:
    _rewrite(repo, lambda rows: [k for k in rows[0] if k != "age"])


def age_abc(repo: Path) -> None:
    def edit(rows):  # noqa: ANN001, ANN202
        rows[6]["age"] = "abc"  # CSV line 8

    _rewrite(repo, edit)


def duplicate_id(repo: Path) -> None:
    def edit(rows):  # noqa: ANN001, ANN202
        rows[9]["image_id"] = rows[3]["image_id"]  # CSV lines 5 and 11

    _rewrite(repo, edit)


def missing_image(repo: Path) -> None:
    with (repo / SITE_CSV).open(newline="") as f:
        rows = list(csv.DictReader(f))
    (repo / "data/sites/hospital" / rows[4]["path"]).unlink()  # CSV line 6


def ragged_row(repo: Path) -> None:
    path = repo / SITE_CSV
    lines = path.read_text().splitlines()
    lines[7] = lines[7].rsplit(",", 1)[0]  # CSV line 8 loses its last field (pandas would pad it)
    path.write_text("\n".join(lines) + "\n")


CASES = {
    "missing-column": (drop_age, ["age"]),
    "age-abc": (age_abc, ["age", "abc", "8"]),
    "duplicate-id": (duplicate_id, ["image_id", "5", "11"]),
    "missing-image": (missing_image, ["missing", "6"]),
    "ragged-row": (ragged_row, ["do not have the header's", "row 8"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_metadata_stops_at_validation(case: str, make_study) -> None:  # noqa: ANN001
    mutate, expected = CASES[case]
    study = make_study(f"bad-{case}", mutate, check=False)
    output = study.repro.stdout + study.repro.stderr
    assert study.repro.returncode != 0, output[-3000:]
    assert "stage validate failed" in output, output[-3000:]
    assert "metadata.csv" in output and "hospital" in output, output[-3000:]
    for word in expected:
        assert word in output, (word, output[-3000:])
    assert not (study.path / "outputs" / "cohorts").exists()
    assert not (study.path / "outputs" / "pretrain").exists()
    assert not (study.path / "outputs" / "register").exists()
    assert (study.path / "outputs" / "validation" / "report.json").is_file()
