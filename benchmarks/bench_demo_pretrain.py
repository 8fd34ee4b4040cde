"""Demo-preset pre-training throughput: today's settings against the alternatives, same run.

Runs the real loop (:func:`retfm.training.pretrain.pretrain_fm`: schedules, checkpoints,
history, the loss's host sync) on in-memory uint8 images at the demo's preset (``micro``: img
64, patch 8, dim 96, depth 4), for each variant, in interleaved rounds so that a noisy
neighbour hits every variant alike; reports images/s (median over rounds) as a ratio to
today's loop (batch 64, 2 threads). Two variants run two pre-trainings at once with one thread
each (what ``make demo`` does with its two replicate lanes): their figure is the two runs'
images together per second of wall time.

Run: ``python benchmarks/bench_demo_pretrain.py [--recipe mae|dinov2] [--rounds 3]``
(writes benchmarks/results/bench_demo_pretrain_<recipe>.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
N_IMAGES = 512


def _one(recipe: str, batch: int, threads: int, epochs: int, seed: int) -> float:
    """Seconds for one pre-training of N_IMAGES images x ``epochs``."""
    import torch

    from retfm.data.images import ArrayImages
    from retfm.models.encoder import Preprocessing
    from retfm.settings import load_settings

    settings = load_settings(Path(__file__).parents[1] / "params.yaml")
    cfg = settings.pretrain.model_copy(
        update={
            "batch_size": batch,
            "num_threads": threads,
            "epochs": epochs,
            "checkpoint_every_steps": 50,
        }  # fmt: skip
    )
    arch = settings.model.presets[settings.model.preset]
    rng = np.random.default_rng(seed)
    images = ArrayImages(rng.integers(0, 255, (N_IMAGES, 64, 64, 3), dtype=np.uint8))
    prep = Preprocessing(img_size=arch.img_size, mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.manual_seed(seed)
    from retfm.training.pretrain import pretrain_fm

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pretrain_fm(recipe, cfg, arch, images, Path(tmp), seed=seed, prep=prep, progress=False)
        return time.perf_counter() - start


def _pair(recipe: str, batch: int, epochs: int) -> float:
    """Two one-thread pre-trainings at once: wall seconds for both."""
    ctx = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    with ctx.Pool(2) as pool:
        pool.starmap(_one, [(recipe, batch, 1, epochs, 0), (recipe, batch, 1, epochs, 1)])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="mae", choices=["mae", "dinov2"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    e = args.epochs
    variants = {
        "today: batch 64, 2 threads": lambda: (_one(args.recipe, 64, 2, e, 0), 1),
        "batch 128, 2 threads": lambda: (_one(args.recipe, 128, 2, e, 0), 1),
        "batch 64, 1 thread": lambda: (_one(args.recipe, 64, 1, e, 0), 1),
        "two runs at once, batch 64, 1 thread each": lambda: (_pair(args.recipe, 64, e), 2),
        "two runs at once, batch 128, 1 thread each": lambda: (_pair(args.recipe, 128, e), 2),
    }
    _one(args.recipe, 64, 2, 1, 0)  # warm-up: imports, allocator
    seen: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            seconds, runs = fn()
            seen[name].append(runs * N_IMAGES * e / seconds)
            print(f"round {r}: {name}: {seen[name][-1]:.0f} images/s", flush=True)
    base = statistics.median(seen["today: batch 64, 2 threads"])
    rows = {
        k: {
            "images_per_s": statistics.median(v),
            "ratio": statistics.median(v) / base,
            "rounds": v,
        }  # fmt: skip
        for k, v in seen.items()
    }
    for k, v in rows.items():
        print(f"{k:45s} {v['images_per_s']:7.0f} images/s  {v['ratio']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_demo_pretrain_{args.recipe}.json"
    out.write_text(json.dumps({"recipe": args.recipe, "epochs": e, "images": N_IMAGES,
                               "variants": rows}, indent=2))  # fmt: skip
    print(f"results: {out}")


if __name__ == "__main__":
    main()
