import json

from retfm.data.metadata import MetadataError, Problem
from retfm.validation.report import (
    Failure,
    SuiteResult,
    ValidationFailed,
    ValidationReport,
    suite_from_metadata_error,
)


def _report() -> ValidationReport:
    bad = SuiteResult(
        name="site.hospital",
        target="data/sites/hospital/metadata.csv",
        success=False,
        failures=[
            Failure(
                "expect_column_values_to_be_between",
                "age",
                3,
                rows=[4, 9],
                values=[130.0, -1.0],
                files=["images/a.png", "images/b.png"],
                detail="expected {'min_value': 0, 'max_value': 120}",
            )
        ],
        notes=["2 exact duplicate row(s) dropped"],
        rows=10,
    )
    return ValidationReport([bad, SuiteResult("task.x", "t.csv", True, rows=5)])


def test_summary_names_suite_rule_count_rows_and_files():
    text = _report().summary_text()
    assert text.splitlines() == [
        "validation FAILED: 1 of 2 suite(s) ok",
        "[FAIL] site.hospital (data/sites/hospital/metadata.csv, 10 rows)",
        "    - expect_column_values_to_be_between on 'age': 3 row(s) "
        "(expected {'min_value': 0, 'max_value': 120}); "
        "e.g. row 4 = 130.0 [images/a.png], row 9 = -1.0 [images/b.png]",
        "    note: 2 exact duplicate row(s) dropped",
        "[ok  ] task.x (t.csv, 5 rows)",
    ]


def test_json_round_trip_and_exception_carries_report(tmp_path):
    report = _report()
    data = json.loads(report.write(tmp_path / "r" / "report.json").read_text())
    assert data["success"] is False
    assert data["suites"][0]["failures"][0]["rows"] == [4, 9]
    err = ValidationFailed(report)
    assert err.report is report and "site.hospital" in str(err)
    assert ValidationReport([report.suites[1]]).success


def test_metadata_error_becomes_a_failed_suite_per_column():
    problems = [Problem("m.csv", r, "sex", "X", "F or M") for r in (2, 3, 4)]
    problems.append(Problem("m.csv", 5, "age", "abc", "years"))
    suite = suite_from_metadata_error("site.a", MetadataError("m.csv", problems), max_rows=2)
    assert not suite.success and suite.target == "m.csv"
    sex, age = suite.failures
    assert (sex.column, sex.count, sex.rows, sex.values) == ("sex", 3, [2, 3], ["X", "X"])
    assert (age.column, age.count, age.rows) == ("age", 1, [5])
    whole = suite_from_metadata_error("site.b", MetadataError("n.csv", [], "n.csv: empty file"), 2)
    assert whole.failures[0].detail == "n.csv: empty file"
