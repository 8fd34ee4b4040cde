"""Read a raw ``metadata.csv`` as hospitals export it, and normalise it by fixed rules.

Hospitals export spreadsheets with byte-order marks, semicolons, ``65y`` ages and ``female``
spelled out. Every such variant is mapped onto the one vocabulary of
:mod:`retfm.data.schema` by the rules below, and nothing else is guessed: a cell that matches
no rule is an error, reported with its file, CSV line number, column and what was expected,
all of them at once, so one edit of the CSV fixes them all.

Rules (copied into the README's "Data format" section):

- encoding: UTF-8; a byte-order mark (as Excel writes) is stripped.
- separator: `,` or `;`, whichever the header line holds more of.
- header: names stripped and lower-cased; a required column missing fails at once.
- blank lines (also lines of separators only): dropped.
- duplicate rows: rows identical in every cell (after stripping spaces) are dropped; their count
  is kept in `df.attrs["duplicate_rows_dropped"]`.
- every cell: leading and trailing spaces stripped; a value may not span lines.
- `image_id`, `patient_id`, `label`, `source_site`: non-empty strings, kept as written.
- `path`: relative to the CSV's folder; `\\` read as `/`, a leading `./` dropped; an absolute
  path (`/x`, `C:\\x`) or any `..` part is an error.
- `age`: `65`, `65.0`, `65y`, `65 yr`, `65 yrs`, `65 years` -> 65.0 (years, float); anything
  else is an error; empty is an error where the column is required (sites), missing elsewhere.
- `sex`: `F f female woman 2` -> `F`; `M m male man 1` -> `M` (2 and 1 are the ISO 5218
  codes); anything else is an error; empty is an error where required, missing elsewhere.
- `ethnicity`: lower-cased, `-`, `_` and runs of spaces folded to one space, then mapped onto
  the schema's categories (`caucasian` -> `white`, `chinese` -> `east_asian`, ...: see
  `ETHNICITY_SYNONYMS`); empty -> `unknown`; an unlisted category is an error.
- `eye`: `L left OS` -> `L`; `R right OD` -> `R`; empty or `unknown` -> `unknown`; anything
  else is an error.
- `split`: `train training` -> `train`; `val valid validation dev` -> `val`;
  `test testing` -> `test`; anything else is an error.
- other columns: kept as stripped text.
- `row` (added): the CSV line number of the row (header = line 1), so later checks can name it.

Value checks that need the study's settings (age range, known sites, unique image ids, labels)
are the validation suites' job (:mod:`retfm.validation.suites`), not this reader's.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from retfm.data import schema

Kind = Literal["site", "task"]

ETHNICITY_SYNONYMS: dict[str, str] = {
    **{c.replace("_", " "): c for c in schema.ETHNICITY},
    "caucasian": "white",
    "european": "white",
    "white british": "white",
    "white european": "white",
    "african": "black",
    "african american": "black",
    "afro caribbean": "black",
    "black african": "black",
    "black caribbean": "black",
    "black british": "black",
    "indian": "south_asian",
    "pakistani": "south_asian",
    "bangladeshi": "south_asian",
    "sri lankan": "south_asian",
    "asian indian": "south_asian",
    "chinese": "east_asian",
    "japanese": "east_asian",
    "korean": "east_asian",
    "han chinese": "east_asian",
    "mixed race": "mixed",
    "multiracial": "mixed",
    "multiple": "mixed",
    "other ethnic group": "other",
    "not known": "unknown",
    "not stated": "unknown",
    "unknown": "unknown",
    "declined": "unknown",
    "prefer not to say": "unknown",
}
SEX_CODES: dict[str, str] = {
    **dict.fromkeys(("f", "female", "woman", "2"), "F"),
    **dict.fromkeys(("m", "male", "man", "1"), "M"),
}
EYE_UNKNOWN = "unknown"
EYE_CODES: dict[str, str] = {
    **dict.fromkeys(("l", "left", "os"), "L"),
    **dict.fromkeys(("r", "right", "od"), "R"),
    EYE_UNKNOWN: EYE_UNKNOWN,
}
SPLIT_CODES: dict[str, str] = {
    **dict.fromkeys(("train", "training"), "train"),
    **dict.fromkeys(("val", "valid", "validation", "dev"), "val"),
    **dict.fromkeys(("test", "testing"), "test"),
}

_AGE = re.compile(r"^(\d+(?:\.\d*)?)\s*(?:y|yr|yrs|year|years)?$", re.IGNORECASE)
_ESCAPING_PATH = r"^/|^[A-Za-z]:|(?:^|/)\.\.(?:/|$)"
_FIRST_DATA_LINE = 2

EXPECTED = {
    "id": "a non-empty identifier",
    "path": "a relative path inside the CSV's folder (not absolute, no '..')",
    "age": "years as a number, e.g. 65, 65.0, 65y or 65 yrs",
    "sex": "F/female/woman/2 or M/male/man/1 (ISO 5218)",
    "ethnicity": f"one of {', '.join(schema.ETHNICITY)} (or a listed synonym), or empty",
    "eye": "L/left/OS or R/right/OD, or empty/unknown",
    "split": "train, val or test",
    "text": "a non-empty value",
    "single_line": "a value without line breaks",
}


@dataclass(frozen=True)
class Problem:
    """One invalid cell: where it is, what it holds, and what the reader expected."""

    file: str
    row: int
    column: str
    value: str
    expected: str

    def __str__(self) -> str:
        return (
            f"{self.file} line {self.row}, column {self.column!r}: "
            f"got {self.value!r}, expected {self.expected}"
        )


class MetadataError(ValueError):
    """A metadata CSV that cannot be read as the raw data contract says; lists every bad cell."""

    def __init__(
        self, file: Path | str, problems: list[Problem], headline: str = "", show: int = 5
    ):
        self.file = str(file)
        self.problems = problems
        counts = Counter(p.column for p in problems)
        lines = [headline or f"{self.file}: {len(problems)} invalid cell(s)"]
        if counts:
            per_column = ", ".join(f"{col}: {n}" for col, n in counts.items())
            lines.append(f"  invalid cells per column: {per_column}")
        lines += [f"  {p}" for p in problems[:show]]
        if len(problems) > show:
            lines.append(f"  ... and {len(problems) - show} more")
        super().__init__("\n".join(lines))


def _required(kind: Kind) -> dict[str, str]:
    return schema.SITE_REQUIRED if kind == "site" else schema.TASK_REQUIRED


def _sniff_separator(header: str) -> str:
    return ";" if header.count(";") > header.count(",") else ","


def _read_text_table(csv_path: Path) -> pd.DataFrame:
    """All cells as stripped strings, one frame row per CSV line (blank lines still in)."""
    try:
        with csv_path.open(encoding="utf-8-sig") as f:
            header = f.readline()
    except UnicodeDecodeError as err:
        raise MetadataError(csv_path, [], f"{csv_path}: not UTF-8 text ({err.reason})") from None
    if not header.strip():
        raise MetadataError(csv_path, [], f"{csv_path}: empty file, expected a header line")
    try:
        with warnings.catch_warnings():
            # a first row longer than the header would silently lose cells: make it an error
            warnings.simplefilter("error", pd.errors.ParserWarning)
            raw = pd.read_csv(
                csv_path,
                sep=_sniff_separator(header),
                dtype=str,
                keep_default_na=False,
                skip_blank_lines=False,
                index_col=False,
                encoding="utf-8-sig",
                engine="c",
            )
    except UnicodeDecodeError as err:
        raise MetadataError(csv_path, [], f"{csv_path}: not UTF-8 text ({err.reason})") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning) as err:
        raise MetadataError(csv_path, [], f"{csv_path}: not a readable CSV: {err}") from None
    names = [str(c).strip().lower() for c in raw.columns]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MetadataError(csv_path, [], f"{csv_path}: header repeats column(s) {dupes}")
    raw.columns = names
    for col in raw.columns:
        raw[col] = raw[col].str.strip()
    raw.insert(0, "row", np.arange(_FIRST_DATA_LINE, _FIRST_DATA_LINE + len(raw), dtype=np.int64))
    return raw


class _Collector:
    """Gathers invalid cells column by column, without a Python loop over valid rows."""

    def __init__(self, file: Path) -> None:
        self.file = str(file)
        self.problems: list[Problem] = []

    def add(self, df: pd.DataFrame, column: str, bad: pd.Series, expected: str) -> None:
        if not bad.any():
            return
        rows = df.loc[bad, "row"].to_numpy()
        values = df.loc[bad, column].to_numpy()
        self.problems += [
            Problem(self.file, int(r), column, str(v), expected)
            for r, v in zip(rows, values, strict=True)
        ]


def _per_value(text: pd.Series, rule: Callable[[pd.Series], pd.Series]) -> pd.Series:
    """Apply ``rule`` once per distinct value, not once per row.

    Demographic columns hold few distinct values (ages, sexes, categories), so a regex or a
    lookup on the distinct values and a gather back is many times faster on a million rows.
    """
    codes, uniques = pd.factorize(text)
    mapped = rule(pd.Series(uniques, dtype="str"))
    return pd.Series(mapped.to_numpy()[codes], index=text.index, dtype=mapped.dtype)


def _age_rule(text: pd.Series) -> pd.Series:
    number = text.str.extract(_AGE, expand=False)
    return pd.to_numeric(number, errors="coerce").astype("float64")


def _parse_age(text: pd.Series) -> pd.Series:
    return _per_value(text, _age_rule)


def _map_codes(text: pd.Series, codes: dict[str, str]) -> pd.Series:
    return _per_value(text, lambda u: u.str.lower().map(codes).astype("str"))


def _map_ethnicity(text: pd.Series) -> pd.Series:
    def rule(u: pd.Series) -> pd.Series:
        folded = u.str.lower().str.replace(r"[\s_\-]+", " ", regex=True)
        return folded.map(ETHNICITY_SYNONYMS).astype("str")

    return _per_value(text, rule)


def _normalise(raw: pd.DataFrame, required: dict[str, str], out: _Collector) -> pd.DataFrame:
    df = raw.copy()
    empty = {col: df[col].eq("") for col in df.columns if col != "row"}

    for col in ("image_id", "patient_id", "label", "source_site", "filename"):
        if col in required:
            out.add(df, col, empty[col], EXPECTED["id" if col.endswith("_id") else "text"])

    if "path" in df.columns:
        path = (
            df["path"].str.replace("\\", "/", regex=False).str.replace(r"^(?:\./)+", "", regex=True)
        )
        escaping = path.str.contains(_ESCAPING_PATH, regex=True)
        out.add(df, "path", empty["path"] | escaping, EXPECTED["path"])
        df["path"] = path

    if "age" in df.columns:
        age = _parse_age(df["age"])
        bad = age.isna() if "age" in required else age.isna() & ~empty["age"]
        out.add(df, "age", bad, EXPECTED["age"])
        df["age"] = age

    if "sex" in df.columns:
        sex = _map_codes(df["sex"], SEX_CODES)
        bad = sex.isna() if "sex" in required else sex.isna() & ~empty["sex"]
        out.add(df, "sex", bad, EXPECTED["sex"])
        df["sex"] = sex

    if "ethnicity" in df.columns:
        eth = _map_ethnicity(df["ethnicity"])
        out.add(df, "ethnicity", eth.isna() & ~empty["ethnicity"], EXPECTED["ethnicity"])
        df["ethnicity"] = eth.where(~empty["ethnicity"], "unknown")

    if "eye" in df.columns:
        eye = _map_codes(df["eye"], EYE_CODES)
        out.add(df, "eye", eye.isna() & ~empty["eye"], EXPECTED["eye"])
        df["eye"] = eye.where(~empty["eye"], EYE_UNKNOWN)

    if "split" in df.columns:
        split = _map_codes(df["split"], SPLIT_CODES)
        out.add(df, "split", split.isna(), EXPECTED["split"])
        df["split"] = split
    return df


def _check_single_line(csv_path: Path, raw: pd.DataFrame, out: _Collector) -> None:
    """A quoted value spanning lines would shift every later line number: refuse it."""
    with csv_path.open("rb") as f:
        newlines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    if newlines <= len(raw) + 1:  # header + one line per record (+ none for a missing final \n)
        return
    for col in raw.columns.drop("row"):
        out.add(raw, col, raw[col].str.contains("\n", regex=False), EXPECTED["single_line"])


def _exact_duplicates(cells: pd.DataFrame) -> pd.Series:
    """Rows equal in every cell to an earlier row; only rows sharing a first cell can be."""
    first = cells.iloc[:, 0]
    candidates = first.duplicated(keep=False)
    duplicate = pd.Series(False, index=cells.index)
    if candidates.any():
        duplicate[candidates] = cells[candidates].duplicated()
    return duplicate


def _read(csv_path: Path, required: dict[str, str], what: str) -> pd.DataFrame:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise MetadataError(csv_path, [], f"{csv_path}: no such metadata file")
    raw = _read_text_table(csv_path)
    missing = [c for c in required if c not in raw.columns]
    if missing:
        expected = "this required column in the header"
        problems = [Problem(str(csv_path), 1, c, "", expected) for c in missing]
        raise MetadataError(
            csv_path,
            problems,
            f"{csv_path}: line 1 (header) lacks required column(s) {missing}; "
            f"a {what} needs {list(required)}, found {list(raw.columns[1:])}",
        )

    cells = raw.drop(columns="row")
    blank = cells.eq("").all(axis=1)
    duplicate = _exact_duplicates(cells) & ~blank
    kept = raw.loc[~blank & ~duplicate].reset_index(drop=True)

    out = _Collector(csv_path)
    _check_single_line(csv_path, raw, out)
    df = _normalise(kept, required, out)
    if out.problems:
        out.problems.sort(key=lambda p: (p.row, p.column))
        raise MetadataError(csv_path, out.problems)
    df.attrs["duplicate_rows_dropped"] = int(duplicate.sum())
    df.attrs["blank_lines_dropped"] = int(blank.sum())
    df.attrs["source"] = str(csv_path)
    return df


def read_metadata(csv_path: Path, kind: Kind) -> pd.DataFrame:
    """Read and normalise one raw ``metadata.csv`` (see the module docstring for the rules).

    Returns one row per kept CSV row with the normalised columns, any extra columns as text,
    and ``row`` (the CSV line number). Raises :class:`MetadataError` naming every invalid cell,
    or at once when a required column is missing.
    """
    if kind not in ("site", "task"):
        raise ValueError(f"kind must be 'site' or 'task', got {kind!r}")
    return _read(Path(csv_path), _required(kind), f"{kind} table")


def read_annotations(csv_path: Path) -> pd.DataFrame:
    """Read a per-image metadata CSV (as public sets ship) by the same rules.

    It needs an ``image_id`` or a ``filename`` column; every other schema column is optional
    and normalised when present (``age``, ``sex``, ``ethnicity``, ``eye``, ``patient_id``, ...).
    """
    csv_path = Path(csv_path)
    header: list[str] = []
    if csv_path.is_file():
        with csv_path.open(encoding="utf-8-sig", errors="replace") as f:
            line = f.readline()
        header = [c.strip().strip('"').lower() for c in line.split(_sniff_separator(line))]
    key = "filename" if "filename" in header and "image_id" not in header else "image_id"
    return _read(csv_path, {key: "str"}, "per-image metadata table")
