"""The field of view is found in raw-looking fundus photographs, cropped and padded to square."""

from __future__ import annotations

import io
import math
import time

import numpy as np
import pytest
from PIL import Image

from retfm.data.fundus import FundusError, find_fov, fundus_square


def photo(
    w: int,
    h: int,
    cx: float,
    cy: float,
    r: float,
    *,
    level: float = 200.0,
    border_noise: float = 2.0,
    seed: int = 0,
) -> np.ndarray:
    """A fundus-like photo: shaded, textured orange retina (red channel ``level`` at the centre,
    55% of it at the rim) inside the circle of radius ``r`` at (cx, cy), a near-black noisy
    border outside it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (r * r)
    shade = (1.0 - 0.45 * d2) * (1.0 + 0.05 * rng.standard_normal((h, w)))
    img = shade[..., None] * np.array([level, 0.45 * level, 0.2 * level])
    border = np.abs(rng.normal(0.0, border_noise, (h, w, 3)))
    img = np.where((d2 < 1.0)[..., None], img, border)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def circle_box(w: int, h: int, cx: float, cy: float, r: float) -> tuple[int, int, int, int]:
    """The box of the pixel centres strictly inside the circle, clipped to the image."""
    return (
        max(0, math.floor(cx - r) + 1),
        max(0, math.floor(cy - r) + 1),
        min(w, math.ceil(cx + r)),
        min(h, math.ceil(cy + r)),
    )


def assert_box(found: tuple[int, int, int, int], expected: tuple[int, int, int, int]) -> None:
    diff = np.abs(np.array(found) - np.array(expected))
    assert diff.max() <= 2, f"box {found}, circle's box {expected}"


def placed_at(square: np.ndarray) -> tuple[int, int]:
    """Where the crop sits in a padded square (the padding is exactly 0, the crop's border noise
    is not)."""
    lit = square.max(axis=2) > 0
    return int(np.flatnonzero(lit.any(0))[0]), int(np.flatnonzero(lit.any(1))[0])


CASES = {
    "centred": (300, 200, 149.5, 99.5, 92.0),
    "off-centre": (300, 200, 105.0, 101.0, 90.0),
    "off-centre right, tall FOV": (400, 300, 250.3, 148.0, 140.0),
    "clipped at the top": (300, 200, 160.0, 88.0, 105.0),
    "clipped at the bottom": (300, 200, 140.0, 112.0, 105.0),
    "clipped top and bottom": (300, 200, 150.0, 98.0, 125.0),
    "large (grid then full resolution)": (1500, 1000, 700.0, 520.0, 480.0),
    "large, clipped at the top": (1500, 1000, 760.0, 450.0, 520.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_box_matches_the_circle_and_the_output_is_square(case):
    w, h, cx, cy, r = CASES[case]
    img = photo(w, h, cx, cy, r)
    fov = find_fov(img)
    assert_box(fov.box, circle_box(w, h, cx, cy, r))
    out = fundus_square(img, fov)
    side = max(fov.width, fov.height)
    assert out.shape == (side, side, 3) and out.dtype == np.uint8
    x, y = placed_at(out)
    np.testing.assert_array_equal(
        out[y : y + fov.height, x : x + fov.width], img[fov.top : fov.bottom, fov.left : fov.right]
    )
    # the circle's centre lands in the middle of the square, clipped or not
    centre = (cx - fov.left + x, cy - fov.top + y)
    assert abs(centre[0] - (side - 1) / 2) <= 1.5 and abs(centre[1] - (side - 1) / 2) <= 1.5, (
        centre,
        side,
    )


def test_a_clipped_fov_is_padded_on_its_clipped_side():
    img = photo(300, 200, 160.0, 88.0, 105.0)  # 17 rows of the circle lie above the image
    fov = find_fov(img)
    assert fov.top == 0 and fov.bottom < 200
    out = fundus_square(img, fov)
    pad = out.shape[0] - fov.height
    assert 16 <= pad <= 19
    assert out[:pad].max() == 0 and out[pad].max() > 0 and out[-1].max() > 0


@pytest.mark.parametrize(
    "where",
    [
        (2, 2, 60, 18, False),
        (240, 185, 298, 199, False),
        (60, 8, 90, 20, False),
        (0, 90, 20, 110, False),
        (55, 5, 100, 22, True),
    ],
    ids=[
        "top-left corner",
        "bottom-right corner",
        "inside the FOV's square",
        "at the edge",
        "solid block over the FOV's square",
    ],
)
def test_bright_text_in_the_border_does_not_extend_the_box(where):
    w, h, cx, cy, r = 300, 200, 150.0, 100.0, 85.0
    img = photo(w, h, cx, cy, r)
    x0, y0, x1, y1, solid = where
    text = img[y0:y1, x0:x1]
    if solid:
        text[:] = 240
    else:
        text[:, ::3] = 255  # glyph-like white strokes
        text[::4] = 230
    fov = find_fov(img)
    assert_box(fov.box, circle_box(w, h, cx, cy, r))


def test_jpeg_noise_in_the_border_is_not_the_fov():
    w, h, cx, cy, r = 600, 400, 280.0, 205.0, 185.0
    buffer = io.BytesIO()
    Image.fromarray(photo(w, h, cx, cy, r, border_noise=4.0)).save(buffer, "JPEG", quality=60)
    img = np.asarray(Image.open(buffer).convert("RGB"))
    outside = img[:, :60]  # JPEG leaves the black border speckled, not black
    assert outside.max() > 0
    assert_box(find_fov(img).box, circle_box(w, h, cx, cy, r))


def test_a_dim_retina_is_found():
    w, h, cx, cy, r = 300, 200, 140.0, 100.0, 90.0
    img = photo(w, h, cx, cy, r, level=45.0)  # red 45 at the centre, about 25 at the rim
    assert int(img.max()) < 60
    fov = find_fov(img)
    assert_box(fov.box, circle_box(w, h, cx, cy, r))
    assert fov.threshold < 25


def test_an_image_without_a_black_border_is_only_padded():
    rng = np.random.default_rng(3)
    img = rng.integers(60, 220, (90, 150, 3), dtype=np.uint8)
    img[:, :, 2] = 20  # dark blue channel: brightness is the channel maximum
    fov = find_fov(img)
    assert fov.box == (0, 0, 150, 90)
    out = fundus_square(img, fov)
    assert out.shape == (150, 150, 3)
    np.testing.assert_array_equal(out[30:120], img)
    assert out[:30].max() == 0 and out[120:].max() == 0


def test_a_square_tight_fov_comes_back_unchanged():
    img = photo(101, 101, 50.0, 50.0, 55.0)  # clipped on all four sides: fills the image
    out = fundus_square(img)
    np.testing.assert_array_equal(out, img)


def test_an_all_black_image_is_a_clear_error():
    img = np.abs(np.random.default_rng(0).normal(0, 2, (200, 300, 3))).astype(np.uint8)
    with pytest.raises(FundusError, match="every pixel is darker than 15"):
        find_fov(img)


def test_only_a_label_is_not_a_fov():
    img = np.zeros((400, 600, 3), np.uint8)
    img[10:30, 20:120] = 255  # a label on an otherwise black export
    with pytest.raises(FundusError, match=r"100x20 px at \(20, 10\) in a 600x400 image"):
        find_fov(img)


def test_grayscale_input_works():
    w, h, cx, cy, r = 300, 200, 150.0, 100.0, 90.0
    grey = photo(w, h, cx, cy, r)[..., 0]
    fov = find_fov(grey)
    assert_box(fov.box, circle_box(w, h, cx, cy, r))
    assert fundus_square(grey, fov).shape == (fov.width, fov.width)


def test_fov_costs_well_under_a_jpeg_decode():
    img = photo(3000, 2000, 1480.0, 1010.0, 970.0, seed=1)
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "JPEG", quality=90)

    def best(fn, n=3):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    decode = best(lambda: np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    crop = best(lambda: fundus_square(img))
    assert crop < 0.5 * decode, f"fov + square {crop * 1000:.1f} ms, decode {decode * 1000:.1f} ms"
