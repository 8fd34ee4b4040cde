"""Packed uint8 image shards: decode and resize once, so training epochs never touch a PNG/JPEG.

Layout of a packed set (one folder)::

    shard_00000.npy ...   uint8 (n, S, S, 3), np.save format, memory-mapped on read
    index.parquet         the metadata rows in pack order + ``shard`` and ``offset`` columns
    manifest.json         count, image_size, shard_size, per-channel mean/std, sha256 fingerprint

Image rule (documented so every consumer agrees): open with Pillow; 16-bit grayscale is scaled
to 8 bit (``v * 255 / 65535``); any other mode (grayscale ``L``, palette, ``RGBA``, ``CMYK``...)
goes through ``Image.convert("RGB")`` (grayscale is replicated to three channels, alpha is
dropped); with ``fundus_crop`` (``pack.fundus_crop``) the photograph is then cropped to the
retina's circular field of view and padded with black to a square (AutoMorph's first step, as
RETFound's authors prepared their data; :mod:`retfm.data.fundus`: an image without a black
border is only padded, one without a field of view is an error); then the shorter side is
resized to ``S`` with bicubic resampling (Pillow antialiases when shrinking) and the centre
``S x S`` is cropped -- exactly torchvision's ``Resize(S, BICUBIC)`` + ``CenterCrop(S)`` on a
PIL image, the RETFound evaluation transform (after the crop the image is square, so nothing of
the retina is cut off). Large JPEGs are first decoded at a reduced DCT scale (``Image.draft``),
never below ``S`` on the shorter side, and with ``fundus_crop`` never below ``2 S``, so the
field of view keeps at least ``S`` pixels (a smaller one is decoded again at full size).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from retfm.data.fundus import FundusError, find_fov, fundus_square

MANIFEST = "manifest.json"
CARD = "card.json"  # a packed cohort also holds its data card (written by the pack stage)
INDEX = "index.parquet"
FORMAT_VERSION = 1
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
#: With ``fundus_crop`` a JPEG is drafted to keep its shorter side >= this many times S: a field
#: of view spans at least half the shorter side in practice (a smaller one is decoded again at
#: full size), so the crop never has fewer than S pixels on its longer side.
_FUNDUS_DRAFT = 2
#: What a pack worker gets per image: (row number, absolute path, row label, size, fundus crop).
_Task = tuple[int, str, str, int, bool]


def eval_resize(img_size: int) -> int:
    """RETFound's evaluation resize (``util/datasets.build_transform``): the shorter side goes
    to ``int(img_size / crop_pct)`` with ``crop_pct = 224 / 256`` up to 224 px (1 above), then
    the centre ``img_size`` square is cropped: 224 -> 256, 64 -> 73, 256 -> 256."""
    crop_pct = 224 / 256 if img_size <= 224 else 1.0
    return int(img_size / crop_pct)


class PackError(ValueError):
    """An image could not be packed (the message names the file and its metadata row)."""


class PackedSetError(ValueError):
    """A packed set folder is missing, incomplete or corrupt."""


def shard_name(number: int) -> str:
    return f"shard_{number:05d}.npy"


def _decode_rgb(path: Path, draft: int | None) -> tuple[Image.Image, bool]:
    """An image file as RGB (module docstring); a JPEG decoded at a reduced DCT scale that
    keeps both sides >= ``draft`` (None: full size). Also says whether it was reduced."""
    with Image.open(path) as img:
        full = img.size
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        if img.mode in _SIXTEEN_BIT:
            wide = np.asarray(img, dtype=np.float64)
            rgb = Image.fromarray((wide * (255.0 / 65535.0) + 0.5).clip(0, 255).astype(np.uint8))
            rgb = rgb.convert("RGB")
        else:
            rgb = img.convert("RGB")
    return rgb, rgb.size != full


def load_image(path: Path, image_size: int, *, fundus_crop: bool = False) -> np.ndarray:
    """Decode one image file by the rule in the module docstring -> uint8 (S, S, 3).

    ``fundus_crop``: crop to the retina's field of view and pad to a square first
    (:mod:`retfm.data.fundus`); a :class:`~retfm.data.fundus.FundusError` when there is none.
    """
    if not fundus_crop:
        rgb, _ = _decode_rgb(path, image_size)
    else:
        rgb, reduced = _decode_rgb(path, _FUNDUS_DRAFT * image_size)
        fov = find_fov(np.asarray(rgb))
        if reduced and max(fov.width, fov.height) < image_size:  # a small FOV: decode it all
            rgb, _ = _decode_rgb(path, None)
            fov = find_fov(np.asarray(rgb))
        rgb = Image.fromarray(fundus_square(np.asarray(rgb), fov))
    w, h = rgb.size
    s = image_size
    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    rgb = rgb.resize(size, Image.Resampling.BICUBIC)  # a no-op copy when already that size
    left, top = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
    return np.asarray(rgb.crop((left, top, left + s, top + s)), dtype=np.uint8)


def _load_row(task: _Task) -> np.ndarray:
    """Worker entry: a :data:`_Task` -> pixels or a PackError."""
    row, path, label, size, fundus_crop = task
    try:
        return load_image(Path(path), size, fundus_crop=fundus_crop)
    except FileNotFoundError:
        raise PackError(f"{path}: image file not found (metadata row {row}, {label})") from None
    except FundusError as err:
        raise PackError(
            f"{path}: cannot crop to the retina (metadata row {row}, {label}): {err} "
            "(pack.fundus_crop: false packs photographs as they are)"
        ) from None
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... on bad files
        raise PackError(
            f"{path}: cannot decode image (metadata row {row}, {label}): "
            f"{type(err).__name__}: {err}"
        ) from None


def _row_label(meta: pd.DataFrame, i: int) -> str:
    if "image_id" in meta.columns:
        return f"image_id={meta['image_id'].iloc[i]!s}"
    return f"path={meta['path'].iloc[i]!s}"


def _decoded(tasks: Sequence[_Task], workers: int) -> Iterator[np.ndarray]:
    """Decoded images in metadata order, from ``workers`` forked processes (or this one)."""
    if workers <= 1:
        yield from map(_load_row, tasks)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_load_row, tasks, chunksize=64)


def pack_images(
    meta: pd.DataFrame,
    root: Path,
    out_dir: Path,
    *,
    image_size: int,
    shard_size: int,
    workers: int = 2,
    progress: bool = True,
    fundus_crop: bool = False,
) -> PackedSet:
    """Decode, resize and pack the images of ``meta`` (``path`` relative to ``root``);
    ``fundus_crop``: crop each to its field of view and pad to a square first (module doc).

    Every other column of ``meta`` is kept in ``index.parquet``, in order, with the image's
    ``shard`` and ``offset``. The set is written to a temporary sibling folder and renamed into
    place, so ``out_dir`` is either the old complete set or the new complete set.
    """
    if "path" not in meta.columns:
        raise PackError(f"metadata has no 'path' column (columns: {list(meta.columns)})")
    clash = [c for c in ("shard", "offset") if c in meta.columns]
    if clash:
        raise PackError(f"metadata already has reserved column(s) {clash}")
    if image_size <= 0 or shard_size <= 0:
        raise PackError(f"image_size and shard_size must be positive ({image_size}, {shard_size})")
    root, out_dir = Path(root), Path(out_dir)
    meta = meta.reset_index(drop=True)
    n = len(meta)
    tasks = [
        (i, str(root / p), _row_label(meta, i), image_size, fundus_crop)
        for i, p in enumerate(meta["path"])
    ]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        stats = _write_shards(tasks, tmp, image_size, shard_size, workers, progress)
        index = meta.copy()
        index["shard"] = np.arange(n, dtype=np.int64) // shard_size
        index["offset"] = np.arange(n, dtype=np.int64) % shard_size
        index.to_parquet(tmp / INDEX, index=False)
        pixels = max(1, n * image_size * image_size)
        mean = stats["sum"] / pixels
        std = np.sqrt(np.maximum(stats["sumsq"] / pixels - mean**2, 0.0))
        manifest = {
            "format_version": FORMAT_VERSION,
            "count": n,
            "image_size": image_size,
            "shard_size": shard_size,
            "shards": [shard_name(k) for k in range(stats["shards"])],
            "mean": [round(float(v), 6) for v in mean],
            "std": [round(float(v), 6) for v in std],
            "sha256": stats["sha256"],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PackedSet(out_dir)


def _write_shards(
    tasks: Sequence[_Task],
    folder: Path,
    size: int,
    shard_size: int,
    workers: int,
    progress: bool,
) -> dict:
    """Fill and save shards in order; returns channel sums over [0, 1] pixels and the digest."""
    n = len(tasks)
    digest = hashlib.sha256()
    total = np.zeros(3, np.float64)
    total_sq = np.zeros(3, np.float64)
    shards = 0
    buf = np.empty((min(shard_size, max(n, 1)), size, size, 3), np.uint8)
    filled = 0

    def flush() -> None:
        nonlocal shards, filled
        path = folder / shard_name(shards)
        np.save(path, buf[:filled])
        digest.update(path.read_bytes())
        shards += 1
        filled = 0

    with tqdm(total=n, desc="pack", unit="img", disable=not progress) as bar:
        for pixels in _decoded(tasks, workers):
            buf[filled] = pixels
            x = pixels.reshape(-1, 3).astype(np.float64) / 255.0
            total += x.sum(0)
            total_sq += (x * x).sum(0)
            filled += 1
            if filled == shard_size:
                flush()
            bar.update()
    if filled or shards == 0:
        flush()
    return {"sum": total, "sumsq": total_sq, "shards": shards, "sha256": digest.hexdigest()}


def _replace_dir(new: Path, target: Path) -> None:
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    new.rename(target)
    if old.exists():
        shutil.rmtree(old)


class PackedSet:
    """A packed folder as an :class:`~retfm.data.images.ImageSource` (memory-mapped shards)."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        manifest = self._read_manifest()
        self.count = int(manifest["count"])
        self.image_size = int(manifest["image_size"])
        self.shard_size = int(manifest["shard_size"])
        self.mean = tuple(float(v) for v in manifest["mean"])
        self.std = tuple(float(v) for v in manifest["std"])
        self.fingerprint = str(manifest["sha256"])
        self._shard_names = [str(name) for name in manifest["shards"]]
        self._shards = [self._open_shard(name) for name in self._shard_names]
        sizes = [len(s) for s in self._shards]
        if sum(sizes) != self.count:
            raise PackedSetError(
                f"{self.folder}: shards hold {sum(sizes)} images, manifest says {self.count}"
            )
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        index = self.folder / INDEX
        if not index.is_file():
            raise PackedSetError(f"{index}: missing (not a complete packed set?)")
        self.meta = pd.read_parquet(index)
        if len(self.meta) != self.count:
            raise PackedSetError(f"{index}: {len(self.meta)} rows, manifest says {self.count}")

    def _read_manifest(self) -> dict:
        path = self.folder / MANIFEST
        if not path.is_file():
            raise PackedSetError(f"{path}: missing (not a packed set, or packing was interrupted)")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PackedSetError(f"{path}: not valid JSON ({err})") from None
        required = ("count", "image_size", "shard_size", "shards", "mean", "std", "sha256")
        missing = [k for k in required if not isinstance(manifest, dict) or k not in manifest]
        if missing:
            raise PackedSetError(f"{path}: missing key(s) {missing}")
        return manifest

    def _open_shard(self, name: str) -> np.ndarray:
        path = self.folder / name
        try:
            shard = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise PackedSetError(f"{path}: cannot read shard ({err})") from None
        s = self.image_size
        if shard.dtype != np.uint8 or shard.ndim != 4 or shard.shape[1:] != (s, s, 3):
            raise PackedSetError(
                f"{path}: expected uint8 (n, {s}, {s}, 3), got {shard.dtype} {shard.shape}"
            )
        return shard

    def __len__(self) -> int:
        return self.count

    def take(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Images at ``indices`` (any order, repeats allowed) -> uint8 (B, S, S, 3).

        Reads shard by shard with sorted offsets (sequential on disk), then puts rows back in
        the requested order.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.count):
            bad = idx[(idx < 0) | (idx >= self.count)][0]
            raise IndexError(f"index {bad} out of range for packed set of {self.count} images")
        s = self.image_size
        out = np.empty((idx.size, s, s, 3), np.uint8)
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        order = np.lexsort((idx, shard_of))
        sorted_shards = shard_of[order]
        bounds = np.flatnonzero(np.diff(sorted_shards)) + 1
        for group in np.split(order, bounds):
            if group.size == 0:
                continue
            k = int(shard_of[group[0]])
            out[group] = self._shards[k][idx[group] - self._starts[k]]
        return out

    def verify(self) -> None:
        """Recompute the shard fingerprint (reads every shard) and compare with the manifest."""
        digest = hashlib.sha256()
        for name in self._shard_names:
            digest.update((self.folder / name).read_bytes())
        if digest.hexdigest() != self.fingerprint:
            raise PackedSetError(f"{self.folder}: shard fingerprint does not match the manifest")
