"""What a validation found, in a form a person can act on and a machine can keep.

A Great Expectations result says *that* an expectation failed; a user needs *where*: which
table, which rule, how many rows, and the first few CSV line numbers, values and files. This
module turns suite results (and unreadable CSVs) into that, as JSON and as a short text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retfm.data.metadata import MetadataError

#: columns that identify an offending row in reports, in the order they are shown
ROW_COLUMN = "row"
FILE_COLUMN = "path"


@dataclass
class Failure:
    """One failed expectation (or one column of an unreadable CSV)."""

    expectation: str
    column: str | None
    count: int | None  # offending rows; None for table-level rules
    rows: list[Any] = field(default_factory=list)  # first few row ids (CSV line numbers)
    values: list[Any] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    detail: str = ""
    message: str = ""  # the problem in plain words, shown instead of rule, count and detail

    def describe(self) -> str:
        where = f" on {self.column!r}" if self.column else ""
        text = f"{self.expectation}{where}"
        if self.count is not None:
            text += f": {self.count} row(s)"
        if self.detail:
            text += f" ({self.detail})"
        if self.message:
            text = self.message.rstrip(".")
        shown = []
        for i, row in enumerate(self.rows):
            item = f"row {row}"
            if i < len(self.values):
                item += f" = {self.values[i]!r}"
            if i < len(self.files) and self.files[i]:
                item += f" [{self.files[i]}]"
            shown.append(item)
        if shown:
            text += "; e.g. " + ", ".join(shown)
        elif self.values:
            text += "; e.g. " + ", ".join(repr(v) for v in self.values)
        return text


@dataclass
class SuiteResult:
    """One suite run on one table (a site, a task, a cohort, ...)."""

    name: str
    target: str
    success: bool
    failures: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # accepted but worth knowing, e.g. grayscale
    evaluated: int = 0  # expectations evaluated
    rows: int = 0  # rows in the table


@dataclass
class ValidationReport:
    """Every suite of one validation stage; ``success`` only when all of them passed."""

    suites: list[SuiteResult] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(s.success for s in self.suites)

    @property
    def failed(self) -> list[SuiteResult]:
        return [s for s in self.suites if not s.success]

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, "suites": [asdict(s) for s in self.suites]}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_jsonable)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    def summary_text(self, max_failures: int = 10) -> str:
        """A few lines a person reads first: which suite, which rule, how many rows, examples."""
        head = "validation passed" if self.success else "validation FAILED"
        lines = [f"{head}: {len(self.suites) - len(self.failed)} of {len(self.suites)} suite(s) ok"]
        for suite in self.suites:
            mark = "ok  " if suite.success else "FAIL"
            lines.append(f"[{mark}] {suite.name} ({suite.target}, {suite.rows} rows)")
            for failure in suite.failures[:max_failures]:
                lines.append(f"    - {failure.describe()}")
            if len(suite.failures) > max_failures:
                lines.append(f"    - ... and {len(suite.failures) - max_failures} more")
            lines += [f"    note: {note}" for note in suite.notes]
        return "\n".join(lines)


class ValidationFailed(Exception):
    """Raised after the report is written, so the pipeline stops and the report says why."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        super().__init__(report.summary_text())


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _plain(value: Any) -> Any:
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and value != value else value


def _exception_message(info: dict[str, Any]) -> str | None:
    """GX keeps one exception per expectation, or one per metric (keyed by metric id)."""
    if info.get("exception_message"):
        return str(info["exception_message"])
    for value in info.values():
        if isinstance(value, dict) and value.get("exception_message"):
            return str(value["exception_message"])
    return None


def failure_from_ge(result: Any, max_rows: int) -> Failure:
    """A :class:`Failure` from one GX ``ExpectationValidationResult`` (SUMMARY format)."""
    config = result.expectation_config
    kwargs = dict(config.kwargs)
    column = kwargs.pop("column", None)
    info = result.result or {}
    exception = _exception_message(result.exception_info or {})
    index_list = info.get("partial_unexpected_index_list") or []
    rows = [_plain(item.get(ROW_COLUMN, item.get("group"))) for item in index_list][:max_rows]
    files = [str(item.get(FILE_COLUMN, "")) for item in index_list][:max_rows]
    if index_list and column:
        values = [_plain(item.get(column)) for item in index_list][:max_rows]
    else:
        values = [_plain(v) for v in info.get("partial_unexpected_list", [])][:max_rows]
    if exception:
        detail = f"could not be evaluated: {exception.splitlines()[0]}"
    elif "observed_value" in info:
        expected = {k: v for k, v in kwargs.items() if k not in ("batch_id", "result_format")}
        detail = f"observed {_plain(info['observed_value'])!r}, expected {expected}"
        if info.get("partial_missing_list"):
            detail += f", missing {info['partial_missing_list']}"
    else:
        expected = {
            k: v
            for k, v in kwargs.items()
            if k in ("value_set", "min_value", "max_value", "regex", "type_")
        }
        detail = f"expected {expected}" if expected else ""
    count = info.get("unexpected_count")
    return Failure(
        expectation=config.type,
        column=column,
        count=None if count is None else int(count),
        rows=rows,
        values=values,
        files=files if any(files) else [],
        detail=detail,
    )


def suite_from_ge(
    name: str, target: str, result: Any, rows: int, max_rows: int, notes: list[str] | None = None
) -> SuiteResult:
    """A :class:`SuiteResult` from a GX ``ExpectationSuiteValidationResult``."""
    failures = [failure_from_ge(r, max_rows) for r in result.results if not r.success]
    return SuiteResult(
        name=name,
        target=target,
        success=bool(result.success),
        failures=failures,
        notes=list(notes or []),
        evaluated=len(result.results),
        rows=rows,
    )


def suite_from_metadata_error(name: str, err: MetadataError, max_rows: int) -> SuiteResult:
    """An unreadable CSV as a failed suite: one failure per column, first few cells each."""
    by_column: dict[str, list[Any]] = {}
    for problem in err.problems:
        by_column.setdefault(problem.column, []).append(problem)
    failures = [
        Failure(
            expectation="read_metadata",
            column=column,
            # a header problem is not a count of rows
            count=None if problems[0].row <= err.header_line else len(problems),
            rows=[p.row for p in problems[:max_rows]],
            values=[p.value for p in problems[:max_rows]],
            detail=f"expected {problems[0].expected}",
        )
        for column, problems in by_column.items()
    ]
    if not failures:  # the file as a whole is unreadable (missing, not UTF-8, bad header)
        failures = [Failure("read_metadata", None, None, detail=str(err))]
    elif err.headline:  # what the problems mean together (e.g. lines short of the header)
        failures.insert(0, Failure("read_metadata", None, None, message=err.headline))
    return SuiteResult(name=name, target=err.file, success=False, failures=failures)
