"""Benchmark: the fundus field-of-view crop (pack.fundus_crop) against decoding the photo.

A hospital export is simulated as a 3000 x 2000 JPEG: a bright retinal disc, off-centre, in a
noisy black border with a burnt-in label. Timed, best of ``--repeats``:
(a) decoding the JPEG in full (what any packing must do),
(b) ``find_fov`` + ``fundus_square`` on the decoded pixels (the crop itself),
(c) ``load_image`` at 224 px (packing one image as the pipeline does) with the crop off and on.
Target: the crop costs well under the decode. Run:
``.venv/bin/python benchmarks/bench_fundus.py [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from retfm.data.fundus import find_fov, fundus_square
from retfm.data.shards import load_image

RESULTS = Path(__file__).parent / "results" / "bench_fundus.json"


def photo(path: Path, w: int = 3000, h: int = 2000) -> tuple[int, int, int]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy, r = int(w * 0.55), h // 2, int(h * 0.47)
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    img = rng.integers(0, 8, (h, w, 3)).astype(np.uint8)  # noisy black border
    retina = np.stack([150 + 40 * np.sin(xx / 90), 70 + 20 * np.cos(yy / 70), 30 + 0 * xx], -1)
    img[disc] = np.clip(retina[disc], 0, 255).astype(np.uint8)
    img[40:90, 60:400] = 255  # a burnt-in label in the corner
    Image.fromarray(img).save(path, quality=92)
    return cx, cy, r


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.jpg"
        cx, cy, r = photo(path)

        def decode() -> np.ndarray:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))

        pixels = decode()
        fov = find_fov(pixels)
        out = {
            "decode_s": best(decode, args.repeats),
            "crop_s": best(lambda: fundus_square(pixels), args.repeats),
            "load_224_off_s": best(lambda: load_image(path, 224), args.repeats),
            "load_224_on_s": best(lambda: load_image(path, 224, fundus_crop=True), args.repeats),
            "box": [int(v) for v in (fov.left, fov.top, fov.right, fov.bottom)],
            "true_box": [cx - r, cy - r, cx + r + 1, cy + r + 1],
        }
    out["crop_vs_decode"] = out["crop_s"] / out["decode_s"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(
        f"decode {out['decode_s'] * 1e3:.1f} ms, crop {out['crop_s'] * 1e3:.1f} ms "
        f"({out['crop_vs_decode']:.2f}x the decode); load_image 224 px: crop off "
        f"{out['load_224_off_s'] * 1e3:.1f} ms, on {out['load_224_on_s'] * 1e3:.1f} ms; "
        f"box {out['box']} vs true {out['true_box']}"
    )


if __name__ == "__main__":
    main()
