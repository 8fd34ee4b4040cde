"""Fundus preparation: crop a photograph to its circular field of view and pad it to a square.

Hospital fundus exports are rectangular photographs (4:3, 3:2...) with a black background around
a circular field of view (FOV), often off-centre, sometimes clipped by the top and bottom edges,
sometimes with text burnt into the black border. RETFound's authors prepared their images with
AutoMorph's first step (crop the black background, pad to square) before ``Resize`` +
``CenterCrop``; :func:`fundus_square` is that step, applied at pack time.

How the FOV is found (:func:`find_fov`, vectorised numpy; steps 1-4 on a grid of every k-th
pixel, k such that the grid's shorter side keeps at least :data:`COARSE_SIDE` pixels, then each
edge of the box is placed at full resolution within 2k pixels of the grid's, by step 4's rule):

1. brightness = the per-pixel maximum over the colour channels (the red channel of a fundus
   photograph, any channel of a grey one);
2. threshold = ``max(min_level, relative_level * median brightness of the pixels above
   min_level)``: JPEG noise in the black border stays under the absolute floor, and the relative
   part follows the exposure (a dim retina gets a low threshold, a bright one a higher one);
3. of the pixels that pass, the connected regions (8-connected) with fewer than
   ``min_region_fraction`` of the largest region's pixels are dropped (text, a logo, specks
   that do not touch the FOV);
4. the column profile (how many pixels of each column pass) keeps the columns holding at least
   ``min_profile_fraction`` of the fullest column's count, and of those only the contiguous run
   that contains the fullest column; the row profile is then taken over those columns only and
   reduced the same way, and the columns once more over those rows. Scattered noise and small
   bright specks (text, labels, a logo in a corner) never reach the fraction, and a mark that is
   separated from the FOV by black columns or rows is a different run, so neither extends the
   box. A circle loses only ``min_profile_fraction**2 * radius / 2`` pixels at each side (1.25 px
   at a 1000 px radius);
5. a box smaller than ``min_fov_fraction`` of the shorter image side in either direction is no
   FOV: :class:`FundusError` names what was found (as it does for an image with nothing above the
   floor, e.g. all black).

:func:`fundus_square` then crops the box and pads it with black to a square of side
``max(width, height)``. The FOV is centred in the square, except along an axis where the box
touches the image edge (the circle was clipped): touching one edge only, all the padding goes on
that side, which restores the circle's position exactly; touching both, the circle's centre is
estimated from the rows (columns) of the widest chord and placed at the square's centre. An
image without a black border is returned unchanged apart from that padding.

Differences from AutoMorph (``M0_Preprocess/fundus_prep.py``): AutoMorph thresholds the
min-max-normalised grey image at ``max(5, mean / 3 - 5)``, fills holes by flood-filling the
background from two corners, opens the mask with a 20 x 20 rectangle (which removes specks
smaller than that, in pixels, whatever the image size), estimates the centre from the rows and
columns within 95% of the widest and the radius from a histogram of edge distances, blacks out
everything outside the fitted circle, then crops the circle's box and pads it, always centred,
to a square. Here the threshold is on the channel maximum (grey conversion dims a red retina),
specks are rejected by region size and profile fractions relative to the FOV (so at any
resolution), holes inside the FOV need no filling (the box only needs its outline), no
circle is fitted (the box comes from the pixels themselves), nothing inside the box is blacked
out (border text inside the FOV's square stays; the model sees black corners either way), the
padding of a clipped FOV restores the circle's position instead of centring the clipped part,
and it needs only numpy and ``scipy.ndimage`` (no OpenCV).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Brightness (0-255) below which a pixel is never part of the FOV (JPEG noise in the border).
MIN_LEVEL = 15
#: Share of the FOV's median brightness below which a pixel is background (follows exposure).
RELATIVE_LEVEL = 0.15
#: A row or column belongs to the FOV when it holds this share of the fullest one's FOV pixels.
MIN_PROFILE_FRACTION = 0.05
#: Bright regions (8-connected) smaller than this share of the largest are not the FOV.
MIN_REGION_FRACTION = 0.05
#: The FOV's box must span this share of the image's shorter side in both directions.
MIN_FOV_FRACTION = 0.2
#: The FOV is first found on a grid of every k-th pixel whose shorter side has this many.
COARSE_SIDE = 256


class FundusError(ValueError):
    """No field of view could be found in an image (the message says what was found)."""


@dataclass(frozen=True)
class FieldOfView:
    """The FOV's bounding box in image pixels (``right``/``bottom`` exclusive), where its
    circle's centre is estimated to be, the brightness threshold used, and the image size."""

    left: int
    top: int
    right: int
    bottom: int
    centre_x: float
    centre_y: float
    threshold: float
    image_width: int
    image_height: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), as Pillow's ``Image.crop`` takes it."""
        return self.left, self.top, self.right, self.bottom


def brightness(image: np.ndarray) -> np.ndarray:
    """Per-pixel brightness of a uint8 (H, W, C) or (H, W) image: the channel maximum."""
    if image.ndim == 2:
        return image
    if image.ndim != 3 or image.shape[2] < 1:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")
    out = image[..., 0]
    for c in range(1, min(image.shape[2], 3)):  # an alpha channel is not brightness
        out = np.maximum(out, image[..., c])
    return out


def _main_regions(mask: np.ndarray, fraction: float) -> np.ndarray:
    """``mask`` without its connected regions (8-connected) smaller than ``fraction`` of the
    largest one: text, a logo or a speck not touching the FOV."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.reshape(-1))
    sizes[0] = 0
    keep = sizes >= fraction * sizes.max()
    keep[0] = False
    return keep[labels]


def _run_around_peak(counts: np.ndarray, fraction: float) -> tuple[int, int]:
    """The contiguous run of entries >= fraction * max that holds the maximum -> [start, stop)."""
    peak = int(np.argmax(counts))
    keep = counts >= max(1.0, fraction * float(counts[peak]))
    gaps = np.flatnonzero(~keep)
    before, after = gaps[gaps < peak], gaps[gaps > peak]
    start = int(before[-1]) + 1 if before.size else 0
    stop = int(after[0]) if after.size else len(counts)
    return start, stop


def _centre(counts: np.ndarray, start: int, stop: int) -> float:
    """Where a clipped circle's centre lies along an axis: the mean position of the chords
    within 95% of the widest (as AutoMorph estimates it), in pixel-centre coordinates."""
    part = counts[start:stop]
    widest = np.flatnonzero(part >= 0.95 * part.max())
    return float(start + widest.mean())


def find_fov(
    image: np.ndarray,
    *,
    min_level: float = MIN_LEVEL,
    relative_level: float = RELATIVE_LEVEL,
    min_profile_fraction: float = MIN_PROFILE_FRACTION,
    min_fov_fraction: float = MIN_FOV_FRACTION,
    min_region_fraction: float = MIN_REGION_FRACTION,
) -> FieldOfView:
    """The bounding box of the retina's circular field of view in a uint8 image (module doc).

    The profiles are first taken on a grid of every k-th row and column (k such that the grid's
    shorter side has at least :data:`COARSE_SIDE` pixels), then each edge is placed at full
    resolution within 2k pixels of the grid's answer, so the cost is a fraction of a decode.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise FundusError(f"empty image ({w}x{h})")
    k = max(1, min(h, w) // COARSE_SIDE)
    coarse = brightness(image[::k, ::k])
    histogram = np.bincount(coarse.reshape(-1), minlength=256)
    floor = int(np.ceil(min_level))
    lit = histogram[floor:]
    if lit.sum() == 0:
        full = brightness(image)
        brightest, lit_pixels = int(full.max()), int(np.count_nonzero(full >= floor))
        found = (
            f"only {lit_pixels} scattered px reach brightness {floor}"
            if lit_pixels
            else f"every pixel is darker than {floor} (an all-black image?)"
        )
        raise FundusError(
            f"no field of view in a {w}x{h} image: {found}; the brightest is {brightest}"
        )
    median = floor + int(np.searchsorted(np.cumsum(lit), (lit.sum() + 1) // 2))
    threshold = max(float(min_level), relative_level * median)
    mask = _main_regions(coarse >= threshold, min_region_fraction)

    columns = mask.sum(0, dtype=np.int64)
    left, right = _run_around_peak(columns, min_profile_fraction)
    rows = mask[:, left:right].sum(1, dtype=np.int64)
    top, bottom = _run_around_peak(rows, min_profile_fraction)
    columns = mask[top:bottom].sum(0, dtype=np.int64)
    left, right = _run_around_peak(columns, min_profile_fraction)
    rows = mask[:, left:right].sum(1, dtype=np.int64)
    centre_x = k * _centre(columns, left, right)
    centre_y = k * _centre(rows, top, bottom)
    peak_x, peak_y = k * int(np.argmax(columns)), k * int(np.argmax(rows))
    if k > 1:  # place each edge at full resolution, near the grid's edge
        span = (max(0, (top - 1) * k), min(h, bottom * k))
        fraction = min_profile_fraction
        left, right = _refine(image, 1, (left, right), k, span, peak_x, threshold, fraction)
        top, bottom = _refine(
            image, 0, (top, bottom), k, (left, right), peak_y, threshold, fraction
        )

    need = min_fov_fraction * min(h, w)
    if right - left < need or bottom - top < need:
        raise FundusError(
            f"no field of view: the largest bright region (brightness >= {threshold:.0f}) is "
            f"{right - left}x{bottom - top} px at ({left}, {top}) in a {w}x{h} image, under "
            f"{min_fov_fraction:.0%} of the shorter side"
        )
    return FieldOfView(
        left=left,
        top=top,
        right=right,
        bottom=bottom,
        centre_x=centre_x,
        centre_y=centre_y,
        threshold=threshold,
        image_width=w,
        image_height=h,
    )


def _refine(
    image: np.ndarray,
    axis: int,
    run: tuple[int, int],
    k: int,
    across: tuple[int, int],
    peak: int,
    threshold: float,
    fraction: float,
) -> tuple[int, int]:
    """Full-resolution [start, stop) along ``axis`` (1: columns, 0: rows) of a run found on the
    k-grid: the profile is counted over ``across`` (the other axis' span) in a band of 3k lines
    around each grid edge, against the fraction of the full-resolution peak line's count, and the
    edge is the last line, going outwards from the FOV, of the unbroken run of lines that pass."""
    extent = image.shape[axis]

    def counts(lo: int, hi: int) -> np.ndarray:
        a, b = across
        part = image[a:b, lo:hi] if axis == 1 else image[lo:hi, a:b]
        return (brightness(part) >= threshold).sum(1 - axis, dtype=np.int64)

    need = max(1.0, fraction * float(counts(peak, peak + 1)[0]))
    start, stop = run
    lo, hi = max(0, (start - 2) * k), min(extent, (start + 1) * k)
    band = counts(lo, hi) >= need
    gaps = np.flatnonzero(~band)
    new_start = lo + int(gaps[-1]) + 1 if gaps.size else lo
    start = new_start if band[-1] else start * k  # (its inner end is inside the FOV)
    lo, hi = max(0, (stop - 2) * k), min(extent, (stop + 1) * k)
    band = counts(lo, hi) >= need
    gaps = np.flatnonzero(~band)
    new_stop = lo + int(gaps[0]) if gaps.size else hi
    stop = new_stop if band[0] else min(extent, (stop - 1) * k + 1)
    return start, stop


def _placement(start: int, stop: int, extent: int, centre: float, side: int) -> int:
    """Offset of the crop [start, stop) of an axis of ``extent`` pixels in a square of ``side``."""
    extra = side - (stop - start)
    if extra <= 0:
        return 0
    at_start, at_end = start == 0, stop == extent
    if at_start and not at_end:  # clipped at the start only: the missing part goes there
        return extra
    if at_end and not at_start:
        return 0
    if at_start and at_end:  # clipped on both sides: put the estimated centre in the middle
        offset = round((side - 1) / 2.0 - (centre - start))
        return int(min(max(offset, 0), extra))
    return extra // 2


def fundus_square(
    image: np.ndarray,
    fov: FieldOfView | None = None,
    **params: float,
) -> np.ndarray:
    """``image`` cropped to its FOV's box and padded with black to a square (module doc).

    ``fov`` is :func:`find_fov`'s answer (found here when omitted; ``params`` go to it).
    Returns a new uint8 array (side, side, C), side = max(box width, box height).
    """
    image = np.asarray(image)
    if fov is None:
        fov = find_fov(image, **params)
    h, w = image.shape[:2]
    crop = image[fov.top : fov.bottom, fov.left : fov.right]
    side = max(fov.width, fov.height)
    if fov.width == fov.height:
        return np.ascontiguousarray(crop)
    x = _placement(fov.left, fov.right, w, fov.centre_x, side)
    y = _placement(fov.top, fov.bottom, h, fov.centre_y, side)
    out = np.zeros((side, side, *image.shape[2:]), dtype=image.dtype)
    out[y : y + fov.height, x : x + fov.width] = crop
    return out
