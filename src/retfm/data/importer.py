"""Turn the common public layout ``<set>/{train,val,test}/<class>/<image>`` into a task folder.

Public fundus sets (APTOS, IDRiD, PAPILA, ...) are usually shared in that layout. The importer
writes ``dst/metadata.csv`` and ``dst/images/<split>/<class>/<image>`` in the raw task format:
``image_id`` is the file stem, ``label`` the class folder, ``split`` the split folder (read by
the same synonyms as the CSV reader: ``valid`` -> ``val``), ``patient_id`` the image id unless
a per-image metadata CSV gives one. That CSV (matched on ``image_id``, or on ``filename``)
adds age, sex, ... normalised by the rules of :mod:`retfm.data.metadata`; its rows that match
no image are reported (logged, and listed in ``df.attrs["unmatched_metadata_rows"]``).

Nothing is skipped quietly: the import returns an :class:`ImportReport` (also in
``df.attrs["import_report"]``; ``retfm import-folder`` prints it) of what was imported per
split and class, every file it skipped and why, and what the layout means for adaptation.

- errors (raise :class:`ImportLayoutError` carrying the report; nothing is written): no image
  at all; no ``train`` split, or one without images (the classifier is fitted on train, so
  the task could never be adapted); a folder under the set that is not a split; two images
  with one file stem (their ids would clash).
- warnings (imported anyway, since the fix is an edit of ``metadata.csv`` or of the source,
  and validation refuses the task until then): a missing ``val`` or ``test`` split; a class
  with no train image; a ``val`` split of one class; a class missing from val or test (it
  counts in no AUROC there); empty class folders; files skipped because their suffix is not
  an image one, or because they do not decode (Pillow ``verify``) or hold another format than
  their suffix says (validation would refuse them).
- notes: hidden files (``.DS_Store``) and files outside ``<split>/<class>/`` (a README),
  ignored.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
from PIL import Image

from retfm.data import schema
from retfm.data.metadata import SPLIT_CODES, read_annotations, read_metadata
from retfm.validation.images import FORMAT_OF_SUFFIX

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(FORMAT_OF_SUFFIX)
_SHOW = 10  # files listed per report line
Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True)
class ImportIssue:
    """One thing the import could not use or that the researcher should know."""

    severity: Severity
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


@dataclass
class ImportReport:
    """What an import found: images per split and class, files skipped (and why), issues."""

    src: str
    dst: str
    images: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> n
    skipped: dict[str, str] = field(default_factory=dict)  # path under src -> why
    issues: list[ImportIssue] = field(default_factory=list)
    unmatched_metadata_rows: list[int] = field(default_factory=list)

    @property
    def errors(self) -> list[ImportIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[ImportIssue]:
        return [i for i in self.issues if i.severity == "warning"]

    def add(self, severity: Severity, message: str) -> None:
        self.issues.append(ImportIssue(severity, message))

    def text(self) -> str:
        """A few lines a person reads: counts, then errors, warnings and notes."""
        total = sum(n for per_class in self.images.values() for n in per_class.values())
        classes = {c for per_class in self.images.values() for c in per_class}
        per_split = ", ".join(
            f"{s} {sum(self.images[s].values())}" for s in schema.SPLITS if s in self.images
        )
        head = f"imported {total} image(s) of {len(classes)} class(es) from {self.src}"
        lines = [f"{head} into {self.dst}" + (f": {per_split}" if per_split else "")]
        order = {"error": 0, "warning": 1, "note": 2}
        lines += [str(i) for i in sorted(self.issues, key=lambda i: order[i.severity])]
        return "\n".join(lines)


class ImportLayoutError(ValueError):
    """The source folder is not in the ``<split>/<class>/<image>`` layout the importer reads."""

    def __init__(self, message: str, report: ImportReport | None = None) -> None:
        super().__init__(message)
        self.report = report


def _listed(paths: list[str], reasons: dict[str, str] | None = None) -> str:
    shown = [f"{p} ({reasons[p]})" if reasons else p for p in paths[:_SHOW]]
    more = f", ... and {len(paths) - _SHOW} more" if len(paths) > _SHOW else ""
    return ", ".join(shown) + more


def _unusable(image: Path) -> str | None:
    """Why an image-named file cannot be imported (cheap: header and Pillow ``verify``)."""
    expected = FORMAT_OF_SUFFIX[image.suffix.lower()]
    try:
        with Image.open(image) as im:
            found = im.format
            im.verify()
    except Exception as err:  # Pillow raises many kinds for a broken file
        reason = str(err).replace(str(image), image.name) or type(err).__name__
        return f"does not decode as an image ({reason})"
    if found != expected:
        return f"{found} bytes named as {expected}"
    return None


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _scan(src: Path, report: ImportReport) -> pd.DataFrame:
    """One row per usable image: image_id, split, label, source (its path under ``src``)."""
    rows = []
    splits = {}
    hidden: list[str] = []
    outside: list[str] = []
    for entry in sorted(src.iterdir()):
        if entry.name.startswith("."):
            hidden.append(entry.name)
        elif not entry.is_dir():
            outside.append(entry.name)
        elif (split := SPLIT_CODES.get(entry.name.lower())) is None:
            raise ImportLayoutError(
                f"{entry}: folder is not a split; expected {sorted(SPLIT_CODES)} under {src}"
            )
        else:
            splits[entry] = split
    empty: list[str] = []
    for split_dir, split in sorted(
        splits.items(), key=lambda s: (schema.SPLITS.index(s[1]), s[0].name)
    ):
        for class_dir in sorted(split_dir.iterdir()):
            rel_dir = class_dir.relative_to(src).as_posix()
            if class_dir.name.startswith("."):
                hidden.append(rel_dir)
                continue
            if not class_dir.is_dir():
                outside.append(rel_dir)
                continue
            found = 0
            for image in sorted(class_dir.iterdir()):
                rel = image.relative_to(src).as_posix()
                if image.name.startswith("."):
                    hidden.append(rel)
                elif not image.is_file():
                    report.skipped[rel] = "a folder inside a class folder"
                elif image.suffix.lower() not in IMAGE_SUFFIXES:
                    report.skipped[rel] = f"not an image (suffix {image.suffix or 'none'})"
                elif (why := _unusable(image)) is not None:
                    report.skipped[rel] = why
                else:
                    rows.append((image.stem, split, class_dir.name, rel))
                    found += 1
            if not found:
                empty.append(rel_dir)
    for rel in outside:
        report.skipped[rel] = "not in a <split>/<class>/ folder"
    in_class = [p for p, why in report.skipped.items() if p not in outside]
    if in_class:
        report.add(
            "warning", f"{len(in_class)} file(s) skipped: {_listed(in_class, report.skipped)}"
        )
    if empty:
        report.add(
            "warning", f"empty class folder(s), nothing imported from them: {_listed(empty)}"
        )
    if outside:
        report.add(
            "note",
            f"{len(outside)} file(s) not in a <split>/<class>/ folder ignored: {_listed(outside)}",
        )
    if hidden:
        report.add("note", f"{len(hidden)} hidden file(s) ignored (e.g. {hidden[0]})")

    table = pd.DataFrame(rows, columns=["image_id", "split", "label", "source"])
    report.images = {
        s: {str(c): int(n) for c, n in group["label"].value_counts().sort_index().items()}
        for s, group in table.groupby("split", sort=False)
    }
    if table.empty:
        report.add("error", f"no images found in <split>/<class>/<image> layout under {src}")
    elif "train" not in set(splits.values()):
        present = ", ".join(repr(s) for s in schema.SPLITS if s in set(splits.values()))
        report.add(
            "error",
            f"no 'train' split folder (found {present}): the classifier is fitted on train, so "
            "the task could never be adapted",
        )
    elif "train" not in report.images:
        report.add("error", "split 'train' holds no images: the classifier is fitted on train")
    if report.errors:
        raise ImportLayoutError(report.text(), report)
    dupes = table[table["image_id"].duplicated(keep=False)]
    if not dupes.empty:
        examples = "; ".join(dupes.groupby("image_id")["source"].agg(", ".join).head(5))
        raise ImportLayoutError(
            f"{src}: {dupes['image_id'].nunique()} image id(s) (file stems) used more than once: "
            f"{examples}",
            report,
        )
    return table


def _adaptation_warnings(report: ImportReport, csv: Path) -> None:
    """What the splits and classes found mean for adaptation (validation's task checks)."""
    roles = {
        "val": "adaptation picks the epoch by validation AUROC",
        "test": "there is nothing to report the classifier's performance on",
    }
    for split, role in roles.items():
        if split not in report.images:
            report.add(
                "warning",
                f"no {split!r} split folder: {role}, so validation will refuse this task until "
                f"some patients get split {split!r} in {csv}",
            )
    counts = pd.DataFrame(report.images).fillna(0).astype(int)
    counts = counts.reindex(columns=list(schema.SPLITS), fill_value=0)
    for cls, row in counts.iterrows():
        if row["train"] == 0:
            where = " and ".join(f"{row[s]} in {s!r}" for s in ("val", "test") if row[s])
            report.add(
                "warning",
                f"class {cls!r} has 0 images in 'train' but {where}: the classifier cannot learn "
                "it, so validation will refuse the task; add train images of it or drop the "
                "class",
            )
            continue
        for split in ("val", "test"):
            if split in report.images and row[split] == 0:
                report.add(
                    "warning",
                    f"class {cls!r} has no images in {split!r} ({row['train']} in 'train'): it "
                    f"counts in no {split} AUROC",
                )
    in_val = list(report.images.get("val", {}))
    if len(in_val) == 1:
        report.add(
            "warning",
            f"split 'val' holds one class only ({in_val[0]!r}): the epoch is picked by "
            "validation AUROC, which needs at least 2 classes, so validation will refuse the "
            "task",
        )


def _join_metadata(table: pd.DataFrame, metadata_csv: Path) -> pd.DataFrame:
    extra = read_annotations(metadata_csv)
    if "image_id" not in extra.columns:
        extra["image_id"] = extra["filename"].map(lambda name: Path(name).stem)
    extra = extra.drop(
        columns=[c for c in ("filename", "path", "label", "split") if c in extra.columns]
    )
    dupes = extra[extra["image_id"].duplicated(keep=False)]
    if not dupes.empty:
        raise ImportLayoutError(
            f"{metadata_csv}: image id(s) {sorted(dupes['image_id'].unique())[:5]} on several rows "
            f"(lines {dupes['row'].head(5).tolist()})"
        )
    unmatched = extra.loc[~extra["image_id"].isin(table["image_id"]), "row"].tolist()
    if unmatched:
        log.warning(
            "%s: %d row(s) match no image (lines %s)", metadata_csv, len(unmatched), unmatched[:10]
        )
    merged = table.merge(
        extra.drop(columns="row"), on="image_id", how="left", suffixes=("", "_meta")
    )
    merged.attrs["unmatched_metadata_rows"] = unmatched
    return merged


def _place(source: Path, target: Path, copy: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(source, target)
        return
    try:
        os.link(source, target)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        raise ImportLayoutError(
            f"{source}: cannot hard-link across file systems into {target.parent}; import with "
            "copy=True (the default)"
        ) from None


def import_folder_layout(
    src: Path,
    dst: Path,
    *,
    source_site: str,
    metadata_csv: Path | None = None,
    copy: bool = True,
) -> pd.DataFrame:
    """Write ``src`` (``<split>/<class>/<image>``) as the task folder ``dst``; return its table.

    ``copy=False`` hard-links the images instead of copying them (same file system only; a
    symbolic link would lead out of the task folder, which validation refuses). The written
    ``metadata.csv`` is read back with :func:`read_metadata`, so what is returned is what the
    pipeline will read; ``df.attrs["import_report"]`` holds the :class:`ImportReport`. Refuses
    to overwrite an existing ``dst/metadata.csv``; raises :class:`ImportLayoutError` on the
    errors of the module docstring.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ImportLayoutError(f"{src}: no such folder")
    if (dst / "metadata.csv").exists():
        raise FileExistsError(f"{dst / 'metadata.csv'} exists; import into an empty folder")
    report = ImportReport(str(src), str(dst))
    table = _scan(src, report)
    _adaptation_warnings(report, dst / "metadata.csv")
    table["source_site"] = source_site
    if metadata_csv is not None:
        table = _join_metadata(table, Path(metadata_csv))
        report.unmatched_metadata_rows = table.attrs["unmatched_metadata_rows"]
        if report.unmatched_metadata_rows:
            lines = report.unmatched_metadata_rows
            report.add(
                "warning",
                f"{metadata_csv}: {len(lines)} row(s) match no image (lines {lines[:_SHOW]})",
            )
    given = table["patient_id"] if "patient_id" in table.columns else table["image_id"]
    table["patient_id"] = given.mask(given.isna() | given.eq(""), table["image_id"])
    table["path"] = "images/" + table["source"]
    for source, path in zip(table["source"], table["path"], strict=True):
        _place(src / source, dst / path, copy)

    first = [*schema.TASK_REQUIRED, *[c for c in schema.TASK_OPTIONAL if c in table.columns]]
    rest = [c for c in table.columns if c not in first and c != "source"]
    dst.mkdir(parents=True, exist_ok=True)
    table[first + rest].to_csv(dst / "metadata.csv", index=False)
    written = read_metadata(dst / "metadata.csv", "task")
    written.attrs["unmatched_metadata_rows"] = report.unmatched_metadata_rows
    written.attrs["import_report"] = report
    return written
