"""Run the suites on the raw tables (and on sampled cohorts), write the report and Data Docs.

The raw stage reads every site and task CSV, checks every image, and runs the suites; the
normalised tables are written only when all of it passed, so a later stage never starts from
data that failed. The report (``report.json``) and the Data Docs (``data_docs/index.html``) are
written either way: they are how a user learns what to fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import great_expectations as gx
import pandas as pd
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

from retfm.data import schema
from retfm.data.metadata import MetadataError, read_metadata
from retfm.data.pseudonyms import load_key, pseudonymise, write_record
from retfm.settings import Settings
from retfm.validation import suites
from retfm.validation.images import check_images
from retfm.validation.report import (
    FILE_COLUMN,
    ROW_COLUMN,
    Failure,
    SuiteResult,
    ValidationFailed,
    ValidationReport,
    suite_from_ge,
    suite_from_metadata_error,
)

DERIVED = (suites.IMAGE_PROBLEM, suites.SEVERAL_SPLITS, suites.IN_HELDOUT)


class SuiteRunner:
    """One ephemeral GX context: suites run in it, and its Data Docs show every run."""

    def __init__(self, docs_dir: Path | None = None, max_rows: int = 5) -> None:
        sites = {}
        if docs_dir is not None:
            sites["retfm"] = {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(docs_dir).resolve()),
                },
            }
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            data_docs_sites=sites,
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        )
        self.context = gx.get_context(mode="ephemeral", project_config=config)
        self.source = self.context.data_sources.add_pandas("retfm")
        self.docs_dir = docs_dir
        self.max_rows = max_rows

    def run(
        self,
        target: str,
        df: pd.DataFrame,
        suite: gx.ExpectationSuite,
        *,
        notes: Iterable[str] = (),
        index_columns: Sequence[str] | None = None,
    ) -> SuiteResult:
        """Validate ``df`` against ``suite``; offending rows are named by ``row`` (and ``path``)."""
        df = _with_string_dtypes(df)
        if index_columns is None:
            index_columns = [c for c in (ROW_COLUMN, FILE_COLUMN) if c in df.columns]
        batch = self.source.add_dataframe_asset(suite.name).add_batch_definition_whole_dataframe(
            "all"
        )
        suite = self.context.suites.add(suite)
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=suite.name, data=batch, suite=suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": df},
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": self.max_rows,
                "unexpected_index_column_names": list(index_columns),
            },
        )
        return suite_from_ge(suite.name, target, result, len(df), self.max_rows, list(notes))

    def build_docs(self) -> Path | None:
        """Write the Data Docs site, made to open offline (:mod:`retfm.validation.offline`);
        returns its ``index.html``."""
        from retfm.validation.offline import make_site_offline

        if self.docs_dir is None:
            return None
        self.context.build_data_docs(site_names=["retfm"])
        make_site_offline(Path(self.docs_dir))
        return Path(self.docs_dir) / "index.html"


def _with_string_dtypes(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding only strings become the string dtype.

    GX checks an object column's type value by value in Python (seconds per million rows), a
    string column by its dtype; a column with mixed types stays object, so GX names the rows.
    """
    strings = [
        c
        for c in df.columns
        if df[c].dtype == object
        and pd.api.types.infer_dtype(df[c], skipna=True) in ("string", "empty")
    ]
    return df.astype(dict.fromkeys(strings, "str")) if strings else df


def run_site_suite(df: pd.DataFrame, settings: Settings, name: str = "site") -> SuiteResult:
    """Validate one site table (normalised, as :func:`read_metadata` returns it) in memory.

    No Data Docs, no image checks: the cheap part a cohort benchmark times.
    """
    runner = SuiteRunner(max_rows=settings.validation.max_report_rows)
    suite = suites.site_suite(
        settings, name, optional=_present(df, schema.SITE_OPTIONAL), images=False
    )
    return runner.run(name, df, suite)


def _present(df: pd.DataFrame, columns: Iterable[str]) -> list[str]:
    return [c for c in columns if c in df.columns]


def _reading_notes(df: pd.DataFrame) -> list[str]:
    notes = []
    if df.attrs.get("duplicate_rows_dropped"):
        notes.append(f"{df.attrs['duplicate_rows_dropped']} exact duplicate row(s) dropped")
    if df.attrs.get("blank_lines_dropped"):
        notes.append(f"{df.attrs['blank_lines_dropped']} blank line(s) dropped")
    if df.attrs.get("empty_columns_dropped"):
        notes.append(
            f"{df.attrs['empty_columns_dropped']} empty unnamed column(s) at the end of the "
            "header dropped"
        )
    return notes


def _image_notes(problems: pd.DataFrame, max_rows: int) -> list[str]:
    infos = problems[problems["severity"].eq("info")]
    notes = []
    for problem, group in infos.groupby("problem"):
        examples = ", ".join(group["path"].head(max_rows))
        notes.append(
            f"{len(group)} image(s) {problem}: {group['detail'].iloc[0]} (e.g. {examples})"
        )
    return notes


def _check_table(
    runner: SuiteRunner,
    settings: Settings,
    kind: str,
    name: str,
    csv_path: Path,
) -> tuple[SuiteResult, pd.DataFrame | None]:
    max_rows = settings.validation.max_report_rows
    try:
        df = read_metadata(csv_path, "site" if kind == "sites" else "task")
    except MetadataError as err:
        return suite_from_metadata_error(name, err, max_rows), None
    notes = _reading_notes(df)
    # links out of the folder are refused even without image checks (decode=False)
    problems = check_images(
        csv_path.parent,
        df["path"].tolist(),
        min_side=settings.validation.min_image_side,
        workers=settings.validation.workers,
        decode=settings.validation.check_images,
    )
    checked = suites.with_image_problems(df, problems)
    notes += _image_notes(problems, max_rows)
    plain: list[Failure] = []
    if kind == "sites":
        optional = _present(df, schema.SITE_OPTIONAL)
        suite = suites.site_suite(settings, name, optional=optional, images=True)
    else:
        checked = suites.with_split_leakage(checked)
        optional = _present(df, schema.TASK_OPTIONAL)
        classes = suites.task_classes(df)
        suite = suites.task_suite(settings, classes, name, optional=optional, images=True)
        plain = suites.task_learnability(checked, name.split(".", 1)[-1], max_rows)
    result = runner.run(str(csv_path), checked, suite, notes=notes)
    if plain:  # the plain-words account first; the expectations' own failures follow
        result.failures[:0] = plain
        result.success = False
    return result, df


def validate_raw(
    settings: Settings, data_root: Path, out_dir: Path, *, docs_dir: Path | None = None
) -> ValidationReport:
    """Validate every site and task of the study under ``data_root`` (the ``data/`` folder).

    Writes ``out_dir/report.json`` and the Data Docs (``docs_dir``, by default
    ``out_dir/data_docs/``; they hold run times, so stages keep them out of DVC outs) always
    (a CSV that cannot be read appears in the report only, as no GX suite ran on it); the
    normalised tables
    ``out_dir/sites/<site>.parquet`` and ``out_dir/tasks/<task>.parquet`` only when everything
    passed (stale ones are removed otherwise), their ``patient_id`` pseudonymised with the
    site's key (:mod:`retfm.data.pseudonyms`; ``out_dir/pseudonyms.json`` records the method and
    the key's fingerprint). Raises :class:`ValidationFailed` on any failure,
    :class:`~retfm.data.pseudonyms.PseudonymError` when the key cannot be read or used.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    key = load_key(settings.privacy.pseudonym_key)  # at the door: before minutes of checks
    runner = SuiteRunner(docs_dir or out_dir / "data_docs", settings.validation.max_report_rows)
    report = ValidationReport()
    tables: dict[Path, pd.DataFrame | None] = {}
    plan = [("sites", s) for s in settings.study.sites] + [
        ("tasks", t) for t in settings.study.tasks
    ]
    for kind, name in plan:
        csv_path = data_root / kind / name / "metadata.csv"
        result, df = _check_table(runner, settings, kind, f"{kind[:-1]}.{name}", csv_path)
        report.suites.append(result)
        tables[out_dir / kind / f"{name}.parquet"] = df
    _finish(report, runner, out_dir)
    read = {path: df for path, df in tables.items() if df is not None}  # all, or _finish raised
    names = {path: str(data_root / path.parent.name / path.stem / "metadata.csv") for path in read}
    private = pseudonymise({names[p]: df for p, df in read.items()}, key)
    for path in read:
        path.parent.mkdir(parents=True, exist_ok=True)
        # no attrs: they hold this machine's paths, and DVC should hash the data alone
        _without_attrs(private[names[path]]).to_parquet(path, index=False)
    patients = len({pid for df in private.values() for pid in df["patient_id"]})
    write_record(key, out_dir / "pseudonyms.json", patients)
    return report


def _without_attrs(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy(deep=False)
    df.attrs = {}
    return df


def _finish(report: ValidationReport, runner: SuiteRunner, out_dir: Path) -> None:
    """Write the report and docs; on failure remove stale outputs and raise."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write(out_dir / "report.json")
    runner.build_docs()
    if not report.success:
        for stale in [*out_dir.glob("sites/*.parquet"), *out_dir.glob("tasks/*.parquet")]:
            stale.unlink()
        raise ValidationFailed(report)


def validate_cohort(
    cohort: pd.DataFrame,
    pool: pd.DataFrame,
    heldout_patients: set[str],
    settings: Settings,
    out_dir: Path,
    *,
    site: str = "cohort",
    docs_dir: Path | None = None,
) -> ValidationReport:
    """Validate a sampled cohort against its site pool and the site's held-out patients.

    Runs the cohort suite (site rules + no held-out patient) and the mix suite (age band and
    sex shares within ``validation.distribution_tolerance`` of the pool's). Writes
    ``out_dir/report.json`` and the Data Docs (``docs_dir``, by default ``out_dir/data_docs/``);
    raises :class:`ValidationFailed`.
    """
    out_dir = Path(out_dir)
    runner = SuiteRunner(docs_dir or out_dir / "data_docs", settings.validation.max_report_rows)
    flagged = suites.with_heldout_flag(cohort, heldout_patients)
    mix = suites.mix_table(cohort, pool, settings)
    report = ValidationReport(
        [
            runner.run(
                f"cohort of {site}",
                flagged,
                suites.cohort_suite(
                    settings, f"cohort.{site}", optional=_present(cohort, schema.SITE_OPTIONAL)
                ),
            ),
            runner.run(
                f"cohort of {site} vs its pool",
                mix,
                suites.mix_suite(settings, f"cohort_mix.{site}"),
                index_columns=["group"],
            ),
        ]
    )
    _finish(report, runner, out_dir)
    return report
