"""Stage validate: Great Expectations on every site's and task's metadata and images.

Bad data stops the pipeline here, before any model sees it: a short report names the suite,
the expectation, how many rows, and the first offending rows or files. Data Docs (HTML) are
written either way to ``outputs/docs/validation/`` and logged to MLflow; they hold run times, so
they sit outside the stage's DVC output (a rerun on unchanged data leaves that byte-identical).
"""

from __future__ import annotations

from pathlib import Path

import typer

from retfm import tracking
from retfm.settings import load_settings
from retfm.stage import stage
from retfm.validation.report import ValidationFailed
from retfm.validation.runner import validate_raw


@stage("validate")
def main() -> None:
    settings = load_settings()
    out = settings.paths.outputs / "validation"
    docs = settings.paths.outputs / "docs" / "validation"
    with tracking.run(settings, "data", name="validate", tags={"stage": "validate"}):
        try:
            report = validate_raw(settings, settings.paths.data, out, docs_dir=docs)
        except ValidationFailed:
            _log(out, docs, success=False)
            raise
        _log(out, docs, success=True)
    print(report.summary_text())


def _log(out: Path, docs: Path, *, success: bool) -> None:
    import mlflow

    mlflow.set_tag("validation.success", str(success).lower())
    if (out / "report.json").is_file():
        mlflow.log_artifact(str(out / "report.json"), "validation")
    if docs.is_dir():
        mlflow.log_artifacts(str(docs), "validation/data_docs")


if __name__ == "__main__":
    typer.run(main)
