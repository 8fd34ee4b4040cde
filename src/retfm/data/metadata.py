"""Read a raw ``metadata.csv`` as hospitals export it, and normalise it by fixed rules.

Hospitals export spreadsheets with byte-order marks, semicolons, ``65y`` ages and ``female``
spelled out. Every such variant is mapped onto the one vocabulary of
:mod:`retfm.data.schema` by the rules below, and nothing else is guessed: a cell that matches
no rule is an error, reported with its file, CSV line number, column and what was expected,
all of them at once, so one edit of the CSV fixes them all.

Rules (copied into the README's "Data format" section):

- encoding: UTF-8; a byte-order mark (as Excel writes) is stripped.
- separator: `,`, `;` or tab, the one the header line holds outside quotes. A header holding
  more than one of them (`image_id;patient_id,path`) is refused: which one separates is not
  certain. Excel's first line `sep=;` (also `sep=,`, or `sep=` and a tab) declares the
  separator; the header is then line 2, and its names may hold the other separators.
  Tabs are accepted because tab-delimited text is a common spreadsheet and LIMS export and a
  tab does not occur in ordinary values, so a header of tabs only is as certain as one of
  commas; a value holding the separator must be in double quotes (`"a,b"`, `""` for a quote).
- structure: every line has one field per header column (an empty value is nothing between
  two separators). A line with fewer fields (pandas would pad it with empty cells, so its
  values may sit in the wrong columns) or more fields than the header is an error naming the
  line and the columns; so is a quote that opens a value and never closes, and a value
  spanning lines. Header names must be present and distinct; empty columns at the end of the
  header (Excel's `a;b;c;;;`) are dropped when no line holds a value in them (their count is
  kept in `df.attrs["empty_columns_dropped"]`), and a value in an unnamed column is an error.
- header: names stripped and lower-cased; a required column missing fails at once.
- blank lines (also lines of separators only): dropped.
- duplicate rows: rows identical in every cell (after stripping spaces) are dropped; their count
  is kept in `df.attrs["duplicate_rows_dropped"]`.
- every cell: leading and trailing spaces stripped; a value may not span lines.
- `image_id`, `patient_id`, `label`, `source_site`: non-empty strings, kept as written.
- `path`: relative to the CSV's folder; `\\` read as `/`, a leading `./` dropped; an absolute
  path (`/x`, `C:\\x`) or any `..` part is an error (and validation's image checks refuse a
  path that a symbolic link leads out of the folder).
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
- `row` (added): the file line number of the row (header = line 1, or 2 after a `sep=` line),
  so later checks can name it.
- a table with no data row left (a header only, or blank lines) is an error.

Value checks that need the study's settings (age range, known sites, unique image ids, labels)
are the validation suites' job (:mod:`retfm.validation.suites`), not this reader's.
"""

from __future__ import annotations

import collections
import csv
import io
import itertools
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
    """One invalid cell (or line): where it is, what it holds, and what the reader expected."""

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
        self,
        file: Path | str,
        problems: list[Problem],
        headline: str = "",
        show: int = 5,
        *,
        header_line: int = 1,
    ):
        self.file = str(file)
        self.problems = problems
        self.header_line = header_line  # problems on this line (or before) are the header's
        self.headline = headline  # what the problems mean together, when more than a count
        counts = Counter(p.column for p in problems)
        lines = [headline or f"{self.file}: {len(problems)} invalid cell(s)"]
        if counts:
            per_column = ", ".join(f"{col}: {n}" for col, n in counts.items())
            lines.append(f"  problems per column: {per_column}")
        lines += [f"  {p}" for p in problems[:show]]
        if len(problems) > show:
            lines.append(f"  ... and {len(problems) - show} more")
        super().__init__("\n".join(lines))


def _required(kind: Kind) -> dict[str, str]:
    return schema.SITE_REQUIRED if kind == "site" else schema.TASK_REQUIRED


SEPARATORS: dict[str, str] = {",": "','", ";": "';'", "\t": "tab"}
_SEP_LINE = re.compile(r'^"?sep=(.)"?$', re.IGNORECASE)
_QUOTED = re.compile(r'"(?:[^"]|"")*"')
_EOF_IN_QUOTE = re.compile(r"EOF inside string starting at row (\d+)")
_LINE_END = re.compile(r"\r\n|\n|\r")


@dataclass(frozen=True)
class _Layout:
    """Where the header is and which separator the file uses."""

    sep: str
    header_line: int  # the header's line in the file: 1, or 2 after a ``sep=`` line
    header: str  # the header line's text


@dataclass
class _Table:
    """The cells of a CSV as stripped strings, with what the structure pass found."""

    frame: pd.DataFrame  # one column per named header column, plus ``row`` (first)
    blank: np.ndarray  # per frame row: every cell empty
    header_line: int
    problems: list[Problem]  # values spanning lines: reported with the cell problems
    empty_columns_dropped: int


def _line_at(text: str, start: int) -> tuple[str, int]:
    """The line starting at ``start`` (without its end: ``\n``, ``\r\n`` or ``\r``), next start."""
    end = _LINE_END.search(text, start)
    if end is None:
        return text[start:], len(text)
    return text[start : end.start()], end.end()


def _decode(csv_path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise MetadataError(
            csv_path, [], f"{csv_path}: not UTF-8 text ({err.reason} on line {line})"
        ) from None


def _layout(csv_path: Path, text: str) -> _Layout:
    """The separator: declared by a first line ``sep=X`` (as Excel writes), else the one of
    ``,`` ``;`` tab that the header line holds outside quotes; refused when it holds several."""
    first, after = _line_at(text, 0)
    declared = _SEP_LINE.match(first)
    if declared:
        sep = declared.group(1)
        if sep not in SEPARATORS:
            raise MetadataError(
                csv_path,
                [Problem(str(csv_path), 1, "(separator)", first, "sep=, sep=; or sep=<tab>")],
                f"{csv_path}: line 1 declares the separator {sep!r} ({first}); "
                f"supported are {', '.join(SEPARATORS.values())}",
                header_line=2,
            )
        header, _ = _line_at(text, after)
        if not header.strip():
            raise MetadataError(
                csv_path, [], f"{csv_path}: line 2 should be the header; it is empty"
            )
        return _Layout(sep, 2, header)
    if not first.strip():
        raise MetadataError(csv_path, [], f"{csv_path}: empty file, expected a header line")
    bare = _QUOTED.sub("", first)
    found = {s: bare.count(s) for s in SEPARATORS if s in bare}
    if len(found) > 1:
        raise _uncertain_separator(csv_path, first, found)
    return _Layout(next(iter(found), ","), 1, first)


def _uncertain_separator(csv_path: Path, header: str, found: dict[str, int]) -> MetadataError:
    sep = max(found, key=lambda s: found[s])
    others = [s for s in found if s != sep]
    counts = " and ".join(f"{SEPARATORS[s]} {n} time(s)" for s, n in found.items())
    names = [n.strip().lower() for n in next(csv.reader([header], delimiter=sep))]
    odd = [n for n in names if any(o in n for o in others)]
    declare = "sep= followed by a tab" if sep == "\t" else f"sep={sep}"
    other = " or ".join(SEPARATORS[o] for o in others)
    expected = f"a name without {other}, or the separator declared by a first line {declare}"
    return MetadataError(
        csv_path,
        [Problem(str(csv_path), 1, n, n, expected) for n in odd],
        f"{csv_path} line 1 (header): the separator is not certain: the line holds {counts} "
        f"outside quotes; read with {SEPARATORS[sep]}, column(s) {odd} would hold {other}. "
        f"Use one separator throughout, put a name holding the other in quotes, or declare "
        f"the separator with a first line {declare}",
    )


def _field_counts(data: bytes, text: str, sep: str, skip: int, *, fast: bool) -> np.ndarray:
    """Fields per CSV record (the header's first), without the first ``skip`` lines.

    Without a quote character (and with ``\n`` line ends) a record is a line: its separators
    are counted with numpy, in well under a second for a million rows. With quotes, the C
    ``csv`` reader (same quoting rules as pandas' C parser) counts them, still without a
    Python loop over the rows.
    """
    if fast and b'"' not in data and data.count(b"\r") == data.count(b"\r\n"):
        buf = np.frombuffer(data, dtype=np.uint8)
        ends = np.flatnonzero(buf == 0x0A)
        if buf.size and buf[-1] != 0x0A:
            ends = np.append(ends, buf.size)
        seps = np.flatnonzero(buf == ord(sep))
        return (np.diff(np.searchsorted(seps, ends), prepend=0) + 1)[skip:]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    for _ in range(skip):
        next(reader, None)
    return np.fromiter(map(len, reader), dtype=np.int64)


def _open_quote(csv_path: Path, text: str, sep: str, record: int, layout: _Layout) -> MetadataError:
    """A quote that never closes (pandas names the record it starts in): name its line."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    collections.deque(itertools.islice(reader, record), maxlen=0)
    line = reader.line_num + 1
    fields = next(reader, [""])
    names = [n.strip().lower() for n in next(csv.reader([layout.header], delimiter=sep))]
    position = len(fields) - 1
    column = names[position] if position < len(names) else f"(field {position + 1})"
    value = fields[-1].split("\n", 1)[0]
    expected = 'a closing quote (") on the same line, or no quote'
    return MetadataError(
        csv_path,
        [Problem(str(csv_path), line, column, value, expected)],
        f"{csv_path} line {line}, column {column!r}: a quote opens a value here and is never "
        f"closed, so every line after it was read into that one value; close the quote or "
        f"remove it",
    )


def _joined(cells: pd.DataFrame, counts: np.ndarray, sep: str) -> np.ndarray:
    """The fields of each row joined by ``sep`` (what the line holds, spaces stripped)."""
    text = cells[0].to_numpy(dtype=object)
    for j in range(1, int(counts.max(initial=1))):
        more = cells[j].to_numpy(dtype=object)
        text = np.where(counts > j, text + sep + more, text)
    return text


def _header_problems(csv_path: Path, line: int, names: list[str], named: int) -> list[Problem]:
    file, problems = str(csv_path), []
    for j in range(named):
        if not names[j]:
            left = next(n for n in reversed(names[:j]) if n) if any(names[:j]) else None
            where = f"after {left!r}" if left else "at the start"
            expected = f"a name for the header's field {j + 1} ({where}), or no column there"
            problems.append(Problem(file, line, f"(unnamed column {j + 1})", "", expected))
    positions: dict[str, list[int]] = {}
    for j, name in enumerate(names[:named]):
        if name:
            positions.setdefault(name, []).append(j + 1)
    for name, found in positions.items():
        if len(found) > 1:
            listed = ", ".join(map(str, found[:-1])) + f" and {found[-1]}"
            expected = "each name once (names are compared stripped and lower-cased)"
            problems.append(Problem(file, line, name, f"columns {listed}", expected))
    return problems


def _structure_problems(
    csv_path: Path,
    cells: pd.DataFrame,
    counts: np.ndarray,
    lines: np.ndarray,
    blank: np.ndarray,
    names: list[str],
    named: int,
    layout: _Layout,
) -> tuple[list[Problem], str]:
    """Lines whose fields do not match the header's columns; vectorised over the good ones."""
    file, sep, hl, width = str(csv_path), layout.sep, layout.header_line, len(names)
    short = (counts < named) & ~blank
    long = (counts > width) & ~blank
    problems: list[Problem] = []
    bad = np.flatnonzero(short | long)
    if bad.size:
        texts = _joined(cells.iloc[bad].reset_index(drop=True), counts[bad], sep)
        beyond = f"(field {width + 1}; the header has {width})"
        for i, line_text in zip(bad.tolist(), texts.tolist(), strict=True):
            n = int(counts[i])
            if n < named:
                missing = ", ".join(repr(c) for c in names[n:named])
                expected = (
                    f"{named} fields, one per header column; this line has {n}, so column(s) "
                    f"{missing} get no value and the values may sit in the wrong columns"
                )
                problems.append(Problem(file, int(lines[i]), names[n], line_text, expected))
            else:
                expected = (
                    f"{width} fields as in the header (line {hl}); this line has {n}: an extra "
                    f"separator, or a value holding {SEPARATORS[sep]} outside quotes, shifts "
                    "its values"
                )
                problems.append(Problem(file, int(lines[i]), beyond, line_text, expected))
    for j in range(named, width):
        expected = (
            f"no value: the header (line {hl}) has no name for this column; name it there "
            "or remove the value"
        )
        holds = cells[j].ne("").to_numpy() & ~long
        problems += [
            Problem(
                file, int(lines[i]), f"(unnamed column {j + 1})", str(cells[j].iat[i]), expected
            )
            for i in np.flatnonzero(holds)
        ]
    problems.sort(key=lambda p: p.row)
    if not bad.size:
        return problems, f"{csv_path}: line(s) hold values in columns the header does not name"
    fields = f"{width} fields" if width == named else f"{named} named columns"
    headline = f"{csv_path}: {len(bad)} line(s) do not have the header's {fields}"
    used = np.unique(counts[~blank])
    if bad.size == np.count_nonzero(~blank) and used.size == 1:
        more = "too many" if used[0] < named else "too few"
        headline += (
            f"; every data line has {used[0]}, so the header (line {hl}) may have a name {more}"
        )
    return problems, headline


def _read_text_table(csv_path: Path) -> _Table:
    """All cells as stripped strings, one frame row per CSV record (blank lines still in).

    Refuses (MetadataError, every problem at once) what would make the columns uncertain: a
    header with several separators, unnamed or repeated header names, a line with fewer or
    more fields than the header, a value in a column the header does not name, a quote that
    never closes. Pandas alone would pad a short line with empty cells (shifting nothing
    visibly), refuse a long first line without naming it, and rename a repeated name.
    """
    data = csv_path.read_bytes()
    text = _decode(csv_path, data)
    layout = _layout(csv_path, text)
    sep, skip, hl = layout.sep, layout.header_line - 1, layout.header_line
    counts = _field_counts(data, text, sep, skip, fast=True)
    raw = None
    for attempt in ("fast", "csv"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)
                raw = pd.read_csv(
                    io.BytesIO(data),
                    sep=sep,
                    header=None,
                    names=list(range(int(counts.max()))),
                    skiprows=skip,
                    dtype=str,
                    keep_default_na=False,
                    skip_blank_lines=False,
                    index_col=False,
                    encoding="utf-8-sig",
                    engine="c",
                )
        except (pd.errors.ParserError, pd.errors.ParserWarning) as err:
            eof = _EOF_IN_QUOTE.search(str(err))
            if eof:
                raise _open_quote(csv_path, text, sep, int(eof.group(1)), layout) from None
            raise MetadataError(csv_path, [], f"{csv_path}: not a readable CSV: {err}") from None
        if len(raw) == len(counts):
            break
        if attempt == "fast":  # line ends the numpy pass does not split alike: count again
            counts = _field_counts(data, text, sep, skip, fast=False)
    assert raw is not None
    if len(raw) != len(counts):
        raise MetadataError(
            csv_path, [], f"{csv_path}: its lines could not be told apart (unusual line ends?)"
        )

    width = int(counts[0])
    names = [str(v).strip().lower() for v in raw.iloc[0, :width]]
    if any("\n" in n for n in names):
        raise MetadataError(csv_path, [], f"{csv_path} line {hl} (header): a name spans lines")
    named = max((j + 1 for j, n in enumerate(names) if n), default=0)
    if named == 0:
        raise MetadataError(csv_path, [], f"{csv_path} line {hl} (header): no column names")
    header_problems = _header_problems(csv_path, hl, names, named)
    if header_problems:
        raise MetadataError(
            csv_path,
            header_problems,
            f"{csv_path}: line {hl} (header) does not name every column once: {names}",
            header_line=hl,
        )

    terminated = len(counts) + skip - (0 if text.endswith(("\n", "\r")) else 1)
    spanning_lines = text.count("\n") > terminated  # some quoted value holds a line break
    del data, text
    cells = pd.DataFrame({col: raw[col].iloc[1:].str.strip() for col in raw.columns})
    del raw
    cells.index = pd.RangeIndex(len(cells))
    counts = counts[1:]
    lines = np.arange(hl + 1, hl + 1 + len(cells), dtype=np.int64)
    spans = np.zeros(len(cells), dtype=np.int64)
    if spanning_lines:  # number the lines exactly: a record then covers several
        for col in cells.columns:
            spans += cells[col].str.count("\n").to_numpy(dtype=np.int64)
        lines += np.cumsum(spans) - spans
    blank = cells.eq("").all(axis=1).to_numpy()
    problems, headline = _structure_problems(
        csv_path, cells, counts, lines, blank, names, named, layout
    )
    if problems:
        raise MetadataError(csv_path, problems, headline, header_line=hl)

    frame = cells[list(range(named))]
    frame.columns = names[:named]
    frame.insert(0, "row", lines)
    spanning = []
    if spans.any():
        for j, name in enumerate(names[:named]):
            for i in np.flatnonzero(cells[j].str.contains("\n", regex=False).to_numpy()):
                value = str(cells[j].iat[i])
                end = lines[i] + value.count("\n")
                expected = (
                    f"a value on one line; this quoted value runs over lines {lines[i]}-{end} "
                    "(a quote left open?)"
                )
                spanning.append(Problem(str(csv_path), int(lines[i]), name, value, expected))
    return _Table(frame, blank, hl, spanning, width - named)


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


def _exact_duplicates(cells: pd.DataFrame) -> pd.Series:
    """Rows equal in every cell to an earlier row; only rows sharing a first cell can be."""
    first = cells.iloc[:, 0]
    candidates = first.duplicated(keep=False)
    duplicate = pd.Series(False, index=cells.index)
    if candidates.any():
        duplicate[candidates] = cells[candidates].duplicated()
    return duplicate


Required = dict[str, str] | Callable[[list[str]], dict[str, str]]


def _read(csv_path: Path, required: Required, what: str) -> pd.DataFrame:
    """``required``: the required columns, or a function of the header's names giving them."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise MetadataError(csv_path, [], f"{csv_path}: no such metadata file")
    table = _read_text_table(csv_path)
    raw, hl = table.frame, table.header_line
    columns = list(raw.columns[1:])
    if callable(required):
        required = required(columns)
    missing = [c for c in required if c not in raw.columns]
    if missing:
        expected = "this required column in the header"
        problems = [Problem(str(csv_path), hl, c, "", expected) for c in missing]
        raise MetadataError(
            csv_path,
            problems,
            f"{csv_path}: line {hl} (header) lacks required column(s) {missing}; "
            f"a {what} needs {list(required)}, found {columns}",
            header_line=hl,
        )

    blank = pd.Series(table.blank, index=raw.index)
    duplicate = _exact_duplicates(raw.drop(columns="row")) & ~blank
    kept = raw.loc[~blank & ~duplicate].reset_index(drop=True)
    if kept.empty:
        after = f"only {int(blank.sum())} blank line(s)" if len(raw) else "nothing"
        raise MetadataError(
            csv_path,
            [],
            f"{csv_path}: no data rows: the header (line {hl}) is followed by {after}; "
            f"a {what} needs at least one row",
            header_line=hl,
        )

    out = _Collector(csv_path)
    out.problems += table.problems
    df = _normalise(kept, required, out)
    if out.problems:
        out.problems.sort(key=lambda p: (p.row, p.column))
        raise MetadataError(csv_path, out.problems, header_line=hl)
    df.attrs["duplicate_rows_dropped"] = int(duplicate.sum())
    df.attrs["blank_lines_dropped"] = int(blank.sum())
    df.attrs["empty_columns_dropped"] = table.empty_columns_dropped
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

    def key(header: list[str]) -> dict[str, str]:
        name = "filename" if "filename" in header and "image_id" not in header else "image_id"
        return {name: "str"}

    return _read(Path(csv_path), key, "per-image metadata table")
