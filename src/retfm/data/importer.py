"""Turn the common public layout ``<set>/{train,val,test}/<class>/<image>`` into a task folder.

Public fundus sets (APTOS, IDRiD, PAPILA, ...) are usually shared in that layout. The importer
writes ``dst/metadata.csv`` and ``dst/images/<split>/<class>/<image>`` in the raw task format:
``image_id`` is the file stem, ``label`` the class folder, ``split`` the split folder (read by
the same synonyms as the CSV reader: ``valid`` -> ``val``), ``patient_id`` the image id unless
a per-image metadata CSV gives one. That CSV (matched on ``image_id``, or on ``filename``)
adds age, sex, ... normalised by the rules of :mod:`retfm.data.metadata`; its rows that match
no image are reported (logged, and listed in ``df.attrs["unmatched_metadata_rows"]``).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pandas as pd

from retfm.data import schema
from retfm.data.metadata import SPLIT_CODES, read_annotations, read_metadata
from retfm.validation.images import FORMAT_OF_SUFFIX

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(FORMAT_OF_SUFFIX)


class ImportLayoutError(ValueError):
    """The source folder is not in the ``<split>/<class>/<image>`` layout the importer reads."""


def _scan(src: Path) -> pd.DataFrame:
    """One row per image: image_id, split, label, source (its path under ``src``)."""
    rows = []
    splits = {}
    for split_dir in (p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        split = SPLIT_CODES.get(split_dir.name.lower())
        if split is None:
            raise ImportLayoutError(
                f"{split_dir}: folder is not a split; expected {sorted(SPLIT_CODES)} under {src}"
            )
        splits[split_dir] = split
    for split_dir, split in sorted(
        splits.items(), key=lambda s: (schema.SPLITS.index(s[1]), s[0].name)
    ):
        for class_dir in sorted(
            p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            for image in sorted(class_dir.iterdir()):
                if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES:
                    rows.append(
                        (image.stem, split, class_dir.name, image.relative_to(src).as_posix())
                    )
    table = pd.DataFrame(rows, columns=["image_id", "split", "label", "source"])
    if table.empty:
        raise ImportLayoutError(f"{src}: no images found in <split>/<class>/<image> layout")
    dupes = table[table["image_id"].duplicated(keep=False)]
    if not dupes.empty:
        examples = "; ".join(dupes.groupby("image_id")["source"].agg(", ".join).head(5))
        raise ImportLayoutError(
            f"{src}: {dupes['image_id'].nunique()} image id(s) (file stems) used more than once: "
            f"{examples}"
        )
    return table


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
    else:
        os.symlink(source.resolve(), target)


def import_folder_layout(
    src: Path,
    dst: Path,
    *,
    source_site: str,
    metadata_csv: Path | None = None,
    copy: bool = True,
) -> pd.DataFrame:
    """Write ``src`` (``<split>/<class>/<image>``) as the task folder ``dst``; return its table.

    ``copy=False`` symlinks the images instead of copying them. The written ``metadata.csv`` is
    read back with :func:`read_metadata`, so what is returned is what the pipeline will read.
    Refuses to overwrite an existing ``dst/metadata.csv``.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ImportLayoutError(f"{src}: no such folder")
    if (dst / "metadata.csv").exists():
        raise FileExistsError(f"{dst / 'metadata.csv'} exists; import into an empty folder")
    table = _scan(src)
    table["source_site"] = source_site
    unmatched: list[int] = []
    if metadata_csv is not None:
        table = _join_metadata(table, Path(metadata_csv))
        unmatched = table.attrs["unmatched_metadata_rows"]
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
    written.attrs["unmatched_metadata_rows"] = unmatched
    return written
