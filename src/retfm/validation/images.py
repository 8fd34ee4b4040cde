"""Check that every image a table names can be decoded, before hours of training find out.

Each file is opened and fully decoded once (a truncated PNG only fails when its last rows are
read). The work is spread over a process pool in chunks, since decoding is CPU-bound.

Problems (at most one error per image, the first in this order):

- `outside_folder` (error): a symbolic link (the file, or a folder on its path) leads out of the
  CSV's folder; the detail says where. A link that stays inside the folder is fine, and so is
  one into the project's DVC cache (``cache.type: symlink`` makes every tracked file one). The
  reader already refuses absolute and `..` paths, so after this check every image the later
  stages open (packing reads ``folder / path``) lies inside its data folder.
- `missing` (error): no such file, or not a regular file.
- `empty` (error): zero bytes.
- `not_an_image` (error): Pillow cannot identify it.
- `format_mismatch` (error): the bytes are another format than the name says (PNG bytes named
  `.jpg`), or the extension is not an image one.
- `truncated` (error): the header reads but the pixels do not fully decode.
- `too_small` (error): the shorter side is below `validation.min_image_side`.
- `converted_to_rgb` (info): a grayscale, palette or alpha image; accepted, and converted to RGB
  when packing.
"""

from __future__ import annotations

import functools
import math
import multiprocessing as mp
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

ERROR = "error"
INFO = "info"
COLUMNS = ["path", "problem", "severity", "detail"]
FORMAT_OF_SUFFIX = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
_INLINE_BELOW = 256  # fewer images than this: a pool costs more than it saves

Row = tuple[str, str, str, str]


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


@functools.lru_cache(maxsize=64)
def dvc_cache_dir(folder: str) -> str | None:
    """The DVC cache of the project holding ``folder`` (its real path), or None outside one."""
    try:
        from dvc.repo import Repo

        with Repo(Repo.find_root(folder)) as repo:
            return os.path.realpath(str(repo.cache.legacy.path))
    except Exception:  # noqa: BLE001 - not a DVC project, or no local cache
        return None


def _inside(real: str, top: str) -> bool:
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _outside(root: str, full: str, cache: str | None = None) -> str | None:
    """Where ``full`` really is, when a symbolic link takes it out of ``root`` (and out of the
    DVC cache ``cache``); else None.

    A folder's real path is resolved once per folder (per process); a file itself costs one
    ``lstat``, and a real-path resolution only when it is a link.
    """
    top = _real_folder(root)
    folder, name = os.path.split(full)
    real = os.path.join(_real_folder(folder), name)
    if os.path.islink(real):
        real = os.path.realpath(real)
    if _inside(real, top) or (cache is not None and _inside(real, cache)):
        return None
    return real


def _check_one(
    root: str, rel: str, min_side: int, decode: bool = True, cache: str | None = None
) -> list[Row]:
    full = os.path.join(root, rel)
    real = _outside(root, full, cache)
    if real is not None:
        detail = f"a symbolic link leads to {real}, outside {root}"
        return [(rel, "outside_folder", ERROR, detail)]
    if not decode:
        return []
    try:
        size = os.stat(full).st_size
    except OSError:
        return [(rel, "missing", ERROR, f"no file at {full}")]
    if not os.path.isfile(full):
        return [(rel, "missing", ERROR, f"{full} is not a regular file")]
    if size == 0:
        return [(rel, "empty", ERROR, "0 bytes")]
    expected = FORMAT_OF_SUFFIX.get(os.path.splitext(rel)[1].lower())
    try:
        with Image.open(full) as im:
            if expected is None:
                return [
                    (rel, "format_mismatch", ERROR, f"{im.format} bytes, unsupported extension")
                ]
            if im.format != expected:
                return [(rel, "format_mismatch", ERROR, f"{im.format} bytes named as {expected}")]
            try:
                im.load()
            except (OSError, SyntaxError, ValueError) as err:
                return [(rel, "truncated", ERROR, f"does not decode: {err}")]
            width, height = im.size
            mode = im.mode
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        return [(rel, "not_an_image", ERROR, str(err).replace(full, rel))]
    except OSError as err:
        return [(rel, "not_an_image", ERROR, f"unreadable: {err}")]
    if min(width, height) < min_side:
        return [(rel, "too_small", ERROR, f"{width}x{height} px, shorter side < {min_side}")]
    if mode != "RGB":
        return [(rel, "converted_to_rgb", INFO, f"mode {mode}, converted to RGB at packing")]
    return []


def _check_chunk(
    root: str, paths: Sequence[str], min_side: int, decode: bool = True, cache: str | None = None
) -> list[Row]:
    return [row for rel in paths for row in _check_one(root, rel, min_side, decode, cache)]


def _pool_context() -> mp.context.BaseContext | None:
    # fork starts workers in milliseconds; elsewhere the platform default is used
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None


def check_images(
    root: Path, paths: Sequence[str], *, min_side: int, workers: int = 2, decode: bool = True
) -> pd.DataFrame:
    """Problems of the images at ``root / path`` for each path; an empty frame when all are fine.

    Returns columns ``path, problem, severity, detail``, in the order of ``paths``; at most one
    error per image (the first found, in the table's order above), infos only for good images.
    ``decode=False`` checks only that no link leads out of ``root`` (``outside_folder``).
    """
    root_str = str(root)
    paths = list(paths)
    _real_folder.cache_clear()  # links may have changed since the last call
    cache = dvc_cache_dir(root_str)
    if workers <= 1 or len(paths) < _INLINE_BELOW:
        rows = _check_chunk(root_str, paths, min_side, decode, cache)
    else:
        size = max(64, math.ceil(len(paths) / (workers * 8)))
        chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
        n = len(chunks)
        with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
            parts = pool.map(
                _check_chunk, [root_str] * n, chunks, [min_side] * n, [decode] * n, [cache] * n
            )
            rows = [row for part in parts for row in part]
    return pd.DataFrame(rows, columns=COLUMNS)
