"""Benchmark: image checks of the validate stage (exists, non-empty, format, full decode, size).

Writes N small fundus-like PNGs (80 px, the demo's raw size), then times
(a) ``retfm.validation.images.check_images`` with 2 workers, and
(b) the obvious alternative, a plain loop: ``Image.open(p).verify()`` then a second open and
    ``load()`` per file (verify alone misses truncated pixel data).
Target: at least 1,000 images per second. Run:
``.venv/bin/python benchmarks/bench_image_checks.py [--images 4000]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from retfm.validation.images import check_images

RESULTS = Path(__file__).parent / "results" / "bench_image_checks.json"


def write_images(folder: Path, n: int, size: int = 80) -> list[str]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        img = np.roll(base, i, axis=0)
        name = f"img_{i:06d}.png"
        Image.fromarray(img).save(folder / name)
        paths.append(name)
    return paths


def plain_loop(root: Path, paths: list[str]) -> int:
    bad = 0
    for rel in paths:
        try:
            with Image.open(root / rel) as img:
                img.verify()
            with Image.open(root / rel) as img:
                img.load()
                bad += min(img.size) < 32
        except Exception:  # noqa: BLE001 - counting failures is the point
            bad += 1
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=4000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_images(root, args.images)
        check_images(root, paths[:300], min_side=32, workers=2)  # warm the pool and caches
        t0 = time.perf_counter()
        problems = check_images(root, paths, min_side=32, workers=2)
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain_bad = plain_loop(root, paths)
        loop = time.perf_counter() - t0
    result = {
        "images": args.images,
        "check_images_s": ours,
        "check_images_per_s": args.images / ours,
        "plain_loop_s": loop,
        "plain_loop_per_s": args.images / loop,
        "ratio_vs_loop": loop / ours,
        "problems_found": int((problems["severity"] == "error").sum()) if len(problems) else 0,
        "plain_loop_problems": plain_bad,
        "target_per_s": 1000,
    }
    print(f"{'method':<28}{'seconds':>10}{'images/s':>12}")
    print(f"{'check_images (2 workers)':<28}{ours:>10.2f}{result['check_images_per_s']:>12.0f}")
    print(f"{'plain PIL loop':<28}{loop:>10.2f}{result['plain_loop_per_s']:>12.0f}")
    print(
        f"ratio {result['ratio_vs_loop']:.2f}x; target >= 1,000 images/s: "
        f"{'met' if result['check_images_per_s'] >= 1000 else 'NOT met'}"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
