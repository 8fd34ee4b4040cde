"""Benchmark: the training input path, packed uint8 shards vs decoding PNGs for every batch.

Steps (wall seconds, images/second):

1. generate ~2,000 synthetic fundus PNGs at 80 px (``retfm.data.synthetic``),
2. pack them once to 64 px uint8 shards (``retfm.data.shards.pack_images``),
3. (a) random batches of 64 through ``PackedSet.take`` + conversion to a float tensor
   (B, 3, 64, 64) in [0, 1] -- what a training epoch does,
4. (b) the obvious alternative: open, decode and resize each batch's PNGs with PIL
   (the same rule, ``load_image``), then the same tensor conversion.

Reports (a) / (b) as a ratio (target >= 5x) and the packing throughput. The machine may be
shared: read the ratio together with the raw numbers. Run:
``.venv/bin/python benchmarks/bench_input_path.py [--images 2000] [--batches 200]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from retfm.data.shards import PackedSet, load_image, pack_images
from retfm.data.synthetic import generate_dataset
from retfm.settings import SyntheticSettings

BATCH = 64
RAW_SIZE, PACKED_SIZE = 80, 64
RESULTS = Path(__file__).parent / "results" / "bench_input_path.json"


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S) in [0, 1]."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)


def time_batches(
    load: Callable[[np.ndarray], torch.Tensor], n_images: int, batches: int, seed: int
) -> tuple[float, float]:
    """Seconds and images/second for ``batches`` random batches of ``BATCH`` (one warm-up)."""
    rng = np.random.default_rng(seed)
    load(rng.choice(n_images, BATCH, replace=False))  # warm-up: page cache, imports
    start = time.perf_counter()
    for _ in range(batches):
        x = load(rng.choice(n_images, BATCH, replace=False))
        assert x.shape == (BATCH, 3, PACKED_SIZE, PACKED_SIZE)
    seconds = time.perf_counter() - start
    return seconds, batches * BATCH / seconds


def main(images: int, batches: int, pil_batches: int, workers: int) -> dict:
    torch.set_num_threads(1)
    cfg = SyntheticSettings.model_validate(
        {
            "seed": 1,
            "image_size": RAW_SIZE,
            "site_images": images,
            "sites": {"bench": "specialist"},
            "tasks": {},
        }
    )
    with tempfile.TemporaryDirectory(prefix="bench_input_path-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        generate_dataset(cfg, ["bench"], root / "data", workers=workers, progress=False)
        generate_s = time.perf_counter() - start

        site = root / "data" / "sites" / "bench"
        meta = pd.read_csv(site / "metadata.csv", dtype=str)
        start = time.perf_counter()
        packed = pack_images(
            meta,
            site,
            root / "packed",
            image_size=PACKED_SIZE,
            shard_size=4096,
            workers=workers,
            progress=False,
        )
        pack_s = time.perf_counter() - start

        paths = [site / p for p in meta["path"]]

        def from_shards(idx: np.ndarray) -> torch.Tensor:
            return to_tensor(packed.take(idx))

        def from_pngs(idx: np.ndarray) -> torch.Tensor:
            return to_tensor(np.stack([load_image(paths[i], PACKED_SIZE) for i in idx]))

        # Same pixels either way, so the comparison is like for like.
        probe = np.arange(8)
        assert torch.equal(from_shards(probe), from_pngs(probe))
        shard_s, shard_rate = time_batches(from_shards, len(packed), batches, seed=0)
        png_s, png_rate = time_batches(from_pngs, len(packed), pil_batches, seed=0)
        reopened = PackedSet(root / "packed")
        assert len(reopened) == images

    return {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "images": images,
        "raw_px": RAW_SIZE,
        "packed_px": PACKED_SIZE,
        "batch": BATCH,
        "workers": workers,
        "generate": {"seconds": round(generate_s, 3), "images_per_s": round(images / generate_s)},
        "pack": {"seconds": round(pack_s, 3), "images_per_s": round(images / pack_s)},
        "packed_take": {
            "batches": batches,
            "seconds": round(shard_s, 4),
            "images_per_s": round(shard_rate),
        },
        "pil_decode": {
            "batches": pil_batches,
            "seconds": round(png_s, 4),
            "images_per_s": round(png_rate),
        },
        "ratio_packed_over_pil": round(shard_rate / png_rate, 1),
        "target_ratio": 5.0,
    }


def print_table(result: dict) -> None:
    rows = [
        ("generate synthetic PNGs", result["generate"]),
        ("pack to uint8 shards", result["pack"]),
        ("(a) PackedSet.take + tensor", result["packed_take"]),
        ("(b) PIL decode+resize + tensor", result["pil_decode"]),
    ]
    print(f"{'step':34s} {'seconds':>9s} {'images/s':>10s}")
    for name, row in rows:
        print(f"{name:34s} {row['seconds']:9.3f} {row['images_per_s']:10d}")
    print(
        f"ratio (a)/(b): {result['ratio_packed_over_pil']}x (target >= {result['target_ratio']}x)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=200, help="packed batches to time")
    parser.add_argument("--pil-batches", type=int, default=20, help="PIL batches to time")
    parser.add_argument("--workers", type=int, default=2, help="for generating and packing")
    args = parser.parse_args()
    result = main(args.images, args.batches, args.pil_batches, args.workers)
    print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
