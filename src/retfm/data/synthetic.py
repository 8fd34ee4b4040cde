"""Built-in synthetic two-site fundus data, written in exactly the raw format a user brings.

Why simulate: the study's question (does pre-training data shape an FM's accuracy and fairness?)
needs two sites whose populations and cameras differ in known, tunable ways. Every difference the
real cohorts have is planted here behind a knob (``synthetic.effects``), so the pipeline can be
checked against ground truth: set ``age_visibility: 0`` and the age gap should vanish.

What is simulated (not patient data):

* populations by site archetype: ``specialist`` (Moorfields-like: older, more disease, ethnically
  mixed, ~50% F), ``community`` (Shanghai-like screening: younger, mostly healthy, mostly East
  Asian, ~58% F) and ``public`` (a third population, like a public DR set); ``population``
  scales their differences (0: every site sees the archetypes' average population);
* a camera style per archetype (colour cast, illumination gradient, field-of-view radius, blur,
  sensor noise) with two camera models per site; ``effects.site_style`` scales the style gap;
* fundus-like images: black outside a circular field of view, orange-red retina with radial
  shading, bright optic disc, darker macula, branching vessels, and disease signs (yellow exudates,
  dark-red haemorrhages) whose number and size grow with a latent severity;
* planted visibility effects: lesion contrast falls with age (``age_visibility``), by sex
  (``sex``: lowered for F, raised for M when negative) and by fundus pigmentation
  (``ethnicity``, which also scales how much pigmentation darkens the fundus: a darker fundus
  changes how lesions stand out, so at 0 every ethnic group's fundus has the same colour);
* a planted alignment effect (``alignment``: site -> strength): the listed sites' cameras
  record low-contrast photographs (contrast around the image's mean colour cut by up to
  ``HAZE_LOSS``), in the pool and in the tasks alike. An FM whose input normalisation comes
  from its own pre-training cohort (``pretrain.normalisation: cohort``) reads them at full
  scale; an FM from another site squeezes them into a sliver of its input range, where its
  position embedding drowns them. (At demo scale, signs that only one site's pool shows, a
  richer pool, or hazier cameras under ImageNet normalisation made no FM reliably better: see
  the README, "How the demo's effects are planted".)
* optionally (``raw_photos``) raw-looking photographs: the same retina framed as a rectangular
  hospital export, off-centre, sometimes clipped at the top or bottom, with a noisy black border
  and sometimes a text-like mark (:func:`frame_photo`); ``pack.fundus_crop`` undoes the framing.

Determinism: metadata comes from one RNG per site (``SeedSequence(seed, spawn_key=(key(site),))``),
each image from its own RNG keyed by its set and index, so the bytes do not depend on the number
of worker processes. PNGs are written by Pillow with fixed options and no metadata chunks; the
CSVs have a fixed column order, row order and float format. Identical bytes need identical
numpy / Pillow (zlib) versions.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from retfm.data.schema import ETHNICITY
from retfm.settings import EffectSettings, SyntheticSettings

SITE_COLUMNS = [
    *("image_id", "patient_id", "path"),
    *("age", "sex", "ethnicity", "eye", "camera", "diagnosis"),
]
TASK_COLUMNS = [
    *("image_id", "patient_id", "path", "label", "split", "source_site"),
    *("age", "sex", "ethnicity", "eye", "camera"),
]

#: Pool diagnosis on a 5-level DR-like scale, from the same latent severity as task labels.
DIAGNOSES = ("none", "mild", "moderate", "severe", "proliferative")

#: Fundus pigmentation by ethnicity, 0 (light) .. 1 (dark): darkens the retina and, when
#: ``effects.ethnicity`` is non-zero, lowers lesion contrast (darker fundi hide signs).
PIGMENT = {
    "white": 0.1,
    "black": 0.9,
    "south_asian": 0.65,
    "east_asian": 0.45,
    "mixed": 0.5,
    "other": 0.5,
    "unknown": 0.5,
}
assert set(PIGMENT) == set(ETHNICITY)

_TASK_ENRICHMENT = 0.8  # logit added for task patients: downstream sets are enriched for disease
_AGE_RISK = 0.4  # disease logit per decade above 55


@dataclass(frozen=True)
class Population:
    """Who a site sees: age ~ N(mean, sd) clipped, P(female), ethnicity mix, disease logit."""

    age_mean: float
    age_sd: float
    age_range: tuple[float, float]
    female: float
    ethnicity: dict[str, float]
    disease_logit: float


@dataclass(frozen=True)
class CameraStyle:
    """How a site's cameras render a fundus (sizes relative to the image side)."""

    cast: tuple[float, float, float]  # RGB gain
    gradient: tuple[float, float]  # illumination slope along x, y (fraction of brightness per R)
    fov: float  # field-of-view radius / image side
    blur: float  # Gaussian blur radius in pixels at an 80 px image
    noise: float  # sensor noise sd on [0, 1] intensities
    models: tuple[str, str]  # the two camera model names written to the `camera` column


POPULATIONS: dict[str, Population] = {
    "specialist": Population(
        62.0,
        14.0,
        (18.0, 95.0),
        0.50,
        {
            "white": 0.46,
            "black": 0.14,
            "south_asian": 0.20,
            "east_asian": 0.06,
            "mixed": 0.05,
            "other": 0.05,
            "unknown": 0.04,
        },
        -0.4,
    ),
    "community": Population(
        45.0,
        11.0,
        (20.0, 85.0),
        0.58,
        {
            "white": 0.01,
            "black": 0.005,
            "south_asian": 0.01,
            "east_asian": 0.94,
            "mixed": 0.02,
            "other": 0.005,
            "unknown": 0.01,
        },
        -1.6,
    ),
    "public": Population(
        54.0,
        12.0,
        (18.0, 90.0),
        0.46,
        {
            "white": 0.15,
            "black": 0.10,
            "south_asian": 0.55,
            "east_asian": 0.10,
            "mixed": 0.04,
            "other": 0.03,
            "unknown": 0.03,
        },
        -0.4,
    ),
}


def _shared_population() -> Population:
    """The average of the archetypes: who every site sees at ``effects.population: 0``."""
    pops = list(POPULATIONS.values())
    names = sorted({e for p in pops for e in p.ethnicity})
    return Population(
        float(np.mean([p.age_mean for p in pops])),
        float(np.mean([p.age_sd for p in pops])),
        (min(p.age_range[0] for p in pops), max(p.age_range[1] for p in pops)),
        float(np.mean([p.female for p in pops])),
        {e: float(np.mean([p.ethnicity.get(e, 0.0) for p in pops])) for e in names},
        float(np.mean([p.disease_logit for p in pops])),
    )


def site_population(archetype: str, effects: EffectSettings) -> Population:
    """An archetype's population, its differences from the shared one scaled by
    ``effects.population`` (0: every site sees the same people, with the same disease)."""
    arch, base, s = POPULATIONS[archetype], _shared_population(), effects.population
    if s == 1.0:
        return arch

    def mix(a: float, b: float) -> float:
        return a + s * (b - a)

    return Population(
        mix(base.age_mean, arch.age_mean),
        mix(base.age_sd, arch.age_sd),
        (mix(base.age_range[0], arch.age_range[0]), mix(base.age_range[1], arch.age_range[1])),
        mix(base.female, arch.female),
        {e: mix(base.ethnicity[e], arch.ethnicity.get(e, 0.0)) for e in base.ethnicity},
        mix(base.disease_logit, arch.disease_logit),
    )


#: What every camera looks like at ``site_style: 0``.
NEUTRAL_STYLE = CameraStyle((1.0, 1.0, 1.0), (0.0, 0.1), 0.45, 0.6, 0.015, ("", ""))

STYLES: dict[str, CameraStyle] = {
    "specialist": CameraStyle(
        (1.08, 0.94, 0.80), (0.18, 0.0), 0.48, 0.35, 0.010, ("Topcon TRC-NW8", "Zeiss Visucam 500")
    ),
    "community": CameraStyle(
        (0.86, 1.06, 1.22), (0.0, 0.32), 0.41, 1.0, 0.025, ("Canon CR-2", "Kowa Nonmyd 7")
    ),
    "public": CameraStyle(
        (1.0, 0.88, 1.08), (-0.2, -0.15), 0.45, 0.7, 0.020, ("Canon CR-1", "Nidek AFC-330")
    ),
}

_CAMERA_SHARE = (0.6, 0.4)  # how often each of a site's two camera models is used


def camera_style(archetype: str, camera: int, site_style: float) -> CameraStyle:
    """The style of camera model ``camera`` (0 or 1) of an archetype, its gap scaled by
    ``site_style`` (0: every camera looks like :data:`NEUTRAL_STYLE`)."""
    arch, base, s = STYLES[archetype], NEUTRAL_STYLE, site_style

    def mix(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(x + s * (y - x) for x, y in zip(a, b, strict=True))

    cast = mix(base.cast, arch.cast)
    blur = base.blur + s * (arch.blur - base.blur)
    if camera == 1:  # the second model: a slightly cooler, softer rendering of the same style
        cast = (cast[0] * (1 - 0.04 * s), cast[1], cast[2] * (1 + 0.05 * s))
        blur *= 1 + 0.25 * s
    return CameraStyle(
        cast=cast,  # type: ignore[arg-type]
        gradient=mix(base.gradient, arch.gradient),  # type: ignore[arg-type]
        fov=base.fov + s * (arch.fov - base.fov),
        blur=max(0.0, blur),
        noise=max(0.0, base.noise + s * (arch.noise - base.noise)),
        models=arch.models,
    )


def lesion_contrast(age: float, sex: str, ethnicity: str, effects: EffectSettings) -> float:
    """Opacity of disease signs in [0.05, 1]: the planted visibility effects.

    Older eyes (media opacity) hide signs: contrast falls linearly by ``age_visibility`` from age
    30 to 80. ``sex`` lowers it by that amount for F (raises it when negative), and ``ethnicity``
    lowers it in proportion to fundus pigmentation (:data:`PIGMENT`).
    """
    age_part = effects.age_visibility * min(max((age - 30.0) / 50.0, 0.0), 1.0)
    sex_part = effects.sex if sex == "F" else 0.0
    eth_part = effects.ethnicity * PIGMENT[ethnicity]
    return float(min(max(1.0 - age_part - sex_part - eth_part, 0.05), 1.0))


def rendered_pigment(ethnicity: str, effects: EffectSettings) -> float:
    """How dark a fundus is drawn: the ethnicity's pigmentation, its difference from the
    average scaled by ``effects.ethnicity`` (capped at 1), so the knob at 0 plants nothing."""
    scale = min(1.0, abs(effects.ethnicity))
    return 0.5 + scale * (PIGMENT[ethnicity] - 0.5)


#: Share of a photograph's contrast that a site at full ``alignment`` strength loses. Measured
#: on the replicated demo (three runs per site): at 0.85 the hospital FM's pooled advantage on
#: hospital_dr is +0.042, below what three runs per site detect there (0.066 at 80% power); a
#: hazier 0.93 made it smaller (+0.012: the hospital's own FM then reads its photographs worse
#: too), so the knob stays at 0.85 and a stronger planted effect needs another mechanism.
HAZE_LOSS = 0.85


def grade(severity: float, classes: int) -> int:
    """Disease grade 0..classes-1 from a latent severity in [0, 1] (0 = healthy)."""
    if severity <= 0.0:
        return 0
    return 1 + min(classes - 2, int(severity * (classes - 1)))


# --------------------------------------------------------------------------- rendering


class RenderJob(NamedTuple):
    """Everything a worker needs to draw and write one image (picklable, no RNG state)."""

    path: str
    spawn_key: tuple[int, int]
    seed: int
    size: int
    style: CameraStyle
    pigment: float
    eye: str
    severity: float
    contrast: float
    haze: float = 0.0  # 0..1: the site's cameras lose this much contrast (effects.alignment)
    raw_photo: bool = False  # frame it as a raw rectangular photograph (synthetic.raw_photos)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel x, y and squared distance from the image centre, float32 (size, size) each."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    return xx, yy, (xx - c) ** 2 + (yy - c) ** 2


def _walk_vessel(
    rng: np.random.Generator,
    draw: ImageDraw.ImageDraw,
    start: tuple[float, float],
    angle: float,
    turn: float,
    steps: int,
    step_len: float,
    width: float,
    limit: tuple[float, float, float],
    depth: int = 0,
) -> None:
    """A vessel as a random walk that bends by ``turn`` per step and branches (coords at 2x)."""
    cx, cy, radius = limit
    x, y = start
    points = [(x, y)]
    for i in range(steps):
        angle += turn + rng.normal(0.0, 0.14)
        x, y = x + step_len * math.cos(angle), y + step_len * math.sin(angle)
        points.append((x, y))
        if (x - cx) ** 2 + (y - cy) ** 2 > (1.05 * radius) ** 2:
            break
        if depth < 2 and i > 1 and rng.random() < 0.18:
            branch = angle + rng.choice((-1.0, 1.0)) * rng.uniform(0.45, 0.85)
            rest = max(2, int((steps - i) * 0.6))
            child = (branch, turn * 0.5, rest, step_len * 0.85, width * 0.65)
            _walk_vessel(rng, draw, (x, y), *child, limit, depth + 1)
    draw.line(points, fill=255, width=max(1, round(width)), joint="curve")


def render_fundus(
    rng: np.random.Generator,
    size: int,
    style: CameraStyle,
    *,
    pigment: float,
    eye: str,
    severity: float,
    contrast: float,
    haze: float = 0.0,
) -> np.ndarray:
    """One fundus-like image, uint8 (size, size, 3).

    Layers, in order: pigmented retina with radial shading and choroidal texture, darker macula,
    optic disc, vessels from the disc, lesions (count and size grow with ``severity``, opacity
    ``contrast``), then the camera: illumination gradient, colour cast, noise, haze (contrast
    around the field's mean colour times ``1 - HAZE_LOSS * haze``), blur, and the circular
    field of view.
    """
    s = size
    xx, yy, centre_d2 = _grid(s)
    c = (s - 1) / 2.0
    radius = style.fov * s
    side = 1.0 if eye == "R" else -1.0  # a right eye's optic disc is on the image's right
    jitter = rng.normal(0.0, 0.03 * radius, 4)
    disc = (c + side * 0.38 * radius + jitter[0], c + 1.3 * jitter[1])
    mac = (c - side * 0.06 * radius + jitter[2], c + jitter[3])

    retina = np.array([0.86 - 0.30 * pigment, 0.40 - 0.15 * pigment, 0.18 - 0.06 * pigment])
    retina = retina * rng.uniform(0.9, 1.1)
    shade = 1.0 - 0.45 * centre_d2 / radius**2
    texture = Image.fromarray(rng.normal(0.0, 1.0, (6, 6)).astype(np.float32), mode="F")
    shade = shade * (1.0 + 0.06 * np.asarray(texture.resize((s, s), Image.Resampling.BICUBIC)))
    d_mac = ((xx - mac[0]) ** 2 + (yy - mac[1]) ** 2) / (0.13 * radius) ** 2
    shade = shade * (1.0 - 0.35 * np.exp(-0.5 * d_mac))
    img = shade[..., None] * retina.astype(np.float32)

    d_disc = ((xx - disc[0]) ** 2 + (yy - disc[1]) ** 2) / (0.11 * radius) ** 2
    g = 0.9 * np.exp(-0.5 * d_disc**2)[..., None]  # flat-topped bright disc
    img = img * (1 - g) + g * np.array([1.0, 0.88, 0.6], dtype=np.float32)

    vessels, exudates, bleeds = _draw_masks(rng, s, radius, disc, mac, severity)
    vessel_colour = (retina * np.array([0.62, 0.32, 0.4])).astype(np.float32)
    img = img * (1 - 0.75 * vessels) + 0.75 * vessels * vessel_colour
    a = np.float32(min(1.0, 0.95 * contrast))
    img = img * (1 - a * bleeds) + a * bleeds * np.array([0.38, 0.06, 0.04], dtype=np.float32)
    img = img * (1 - a * exudates) + a * exudates * np.array([1.0, 0.9, 0.42], dtype=np.float32)

    gx, gy = style.gradient
    img = img * (1.0 + gx * (xx - c) / radius + gy * (yy - c) / radius)[..., None]
    img = img * np.array(style.cast, dtype=np.float32)
    img = img + np.float32(style.noise) * rng.standard_normal(img.shape, dtype=np.float32)
    if haze > 0:
        mean = img[centre_d2 < radius**2].mean(axis=0)
        img = mean + np.float32(1.0 - HAZE_LOSS * haze) * (img - mean)
    out = Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    blur = style.blur * s / 80.0
    if blur > 0.05:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    fov = np.clip(radius - np.sqrt(centre_d2) + 0.5, 0.0, 1.0)[..., None]  # 1 px soft edge
    return (np.asarray(out, dtype=np.float32) * fov + 0.5).astype(np.uint8)


def _draw_masks(
    rng: np.random.Generator,
    s: int,
    radius: float,
    disc: tuple[float, float],
    mac: tuple[float, float],
    severity: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vessel, exudate and haemorrhage masks in [0, 1], (s, s, 1) each; drawn at 2x then
    box-reduced so thin lines and small spots are anti-aliased."""
    k = 2
    masks = [Image.new("L", (k * s, k * s)) for _ in range(3)]
    draws = [ImageDraw.Draw(m) for m in masks]
    c2, r2 = k * (s - 1) / 2.0, k * radius
    d2 = (k * disc[0], k * disc[1])
    toward_macula = math.atan2(mac[1] - disc[1], mac[0] - disc[0])
    width = max(1.0, 0.05 * r2)
    limit = (c2, c2, r2)
    for sign in (1.0, -1.0):  # temporal arcades arch around the macula
        angle = toward_macula + sign * rng.uniform(0.85, 1.25)
        turn = -sign * rng.uniform(0.12, 0.18)
        _walk_vessel(rng, draws[0], d2, angle, turn, 16, 0.1 * r2, width, limit)
    for sign in (1.0, -1.0):  # shorter, straighter nasal vessels
        angle = toward_macula + math.pi + sign * rng.uniform(0.4, 1.0)
        turn = rng.normal(0.0, 0.05)
        _walk_vessel(rng, draws[0], d2, angle, turn, 7, 0.1 * r2, width * 0.8, limit)

    healthy = severity <= 0.0
    # Healthy eyes get the odd drusen-like spot or small bleed too: signs are evidence, not proof.
    n_exudates = rng.poisson(0.4 if healthy else 1.0 + 12.0 * severity)
    n_bleeds = rng.poisson(0.4 if healthy else 1.0 + 10.0 * severity)
    for draw, n, lo, hi, spread in (
        (draws[1], n_exudates, 0.02, 0.035 + 0.035 * severity, 0.3),
        (draws[2], n_bleeds, 0.025, 0.04 + 0.035 * severity, 0.5),
    ):
        for _ in range(n):
            for _attempt in range(4):  # lesions cluster around the macula, inside the field
                x, y = rng.normal(0.0, spread, 2)
                if x * x + y * y < 0.8:
                    break
            px, py = k * mac[0] + x * r2, k * mac[1] + y * r2
            rx = rng.uniform(lo, hi) * r2
            ry = rx * rng.uniform(0.7, 1.3)
            draw.ellipse((px - rx, py - ry, px + rx, py + ry), fill=255)
    out = [np.asarray(m.reduce(k), dtype=np.float32)[..., None] / 255.0 for m in masks]
    return out[0], out[1], out[2]


#: Photograph aspect ratios (width / height) of raw-looking photos.
RAW_ASPECTS = (4.0 / 3.0, 3.0 / 2.0)
#: Share of raw-looking photos whose field of view is clipped by the top or bottom edge.
RAW_CLIPPED = 0.3
#: Share of raw-looking photos with a text-like mark burnt into a corner of the border.
RAW_MARKED = 0.5


def frame_photo(rng: np.random.Generator, retina: np.ndarray, radius: float) -> np.ndarray:
    """A rendered fundus (:func:`render_fundus`, field-of-view radius ``radius`` pixels around
    the image centre) framed as a raw hospital export, uint8 (H, W, 3).

    The photograph is as high as the rendering (H = its side) and 4:3 or 3:2 wide; the
    rendering's pixels inside the field of view are pasted unchanged, at a random whole-pixel
    offset: anywhere horizontally that keeps the circle inside, vertically centred within a
    pixel or (:data:`RAW_CLIPPED` of photos) pushed over the top or bottom edge by 5-20% of the
    radius. The border is near-black sensor noise (0-8 of 255), and :data:`RAW_MARKED` of photos
    carry a small bright text-like mark in a corner of the wider side margin, away from the
    circle. Only ``rng`` is drawn from, so the retina is the same with and without framing.
    """
    s = retina.shape[0]
    xx, yy, centre_d2 = _grid(s)
    c = (s - 1) / 2.0
    height = s
    width = round(height * RAW_ASPECTS[int(rng.integers(len(RAW_ASPECTS)))])
    lo, hi = math.ceil(radius - c + 1), math.floor(width - 2 - c - radius)
    ox = int(rng.integers(lo, hi + 1)) if hi >= lo else (width - s) // 2
    clip = rng.uniform(0.05, 0.2) * radius
    if rng.random() < RAW_CLIPPED:
        top = rng.random() < 0.5  # the disc is pushed over the top (or bottom) edge
        oy = math.floor(radius - c - clip) if top else math.ceil(height - 1 + clip - c - radius)
    else:
        lo, hi = math.ceil(radius - c), math.floor(height - 1 - c - radius)
        oy = int(rng.integers(lo, hi + 1)) if hi >= lo else 0
    photo = np.clip(rng.normal(2.0, 1.5, (height, width, 3)), 0.0, 8.0).round().astype(np.uint8)
    inside = centre_d2 < (radius + 0.5) ** 2  # where render_fundus drew the field of view
    ys, xs = slice(max(0, -oy), min(s, height - oy)), slice(max(0, -ox), min(s, width - ox))
    target = photo[ys.start + oy : ys.stop + oy, xs.start + ox : xs.stop + ox]
    np.copyto(target, retina[ys, xs], where=inside[ys, xs, None])

    marked = rng.random() < RAW_MARKED
    mark_bits, mark_level, mark_top = rng.random(width), rng.uniform(170, 255), rng.random() < 0.5
    if marked:
        left_margin = math.ceil(ox + c - radius) - 1  # free columns left of the circle
        right_margin = width - math.floor(ox + c + radius) - 2
        margin = max(left_margin, right_margin)
        mark_w, mark_h = min(round(0.12 * width), margin - 4), max(2, round(0.05 * height))
        if mark_w >= 4:
            x0 = 1 if left_margin >= right_margin else width - 1 - mark_w
            y0 = 1 if mark_top else height - 1 - mark_h
            strokes = np.flatnonzero(mark_bits[:mark_w] < 0.6)  # glyph-like vertical strokes
            photo[y0 : y0 + mark_h, x0 + strokes] = np.uint8(mark_level)
    return photo


def _render_and_write(job: RenderJob) -> None:
    rng = _rng(job.seed, *job.spawn_key)
    pixels = render_fundus(
        rng,
        job.size,
        job.style,
        pigment=job.pigment,
        eye=job.eye,
        severity=job.severity,
        contrast=job.contrast,
        haze=job.haze,
    )
    if job.raw_photo:  # framing draws from its own stream: the retina stays the same
        pixels = frame_photo(_rng(job.seed, *job.spawn_key, 1), pixels, job.style.fov * job.size)
    # Fixed options; Pillow writes no time or text chunks unless asked.
    Image.fromarray(pixels).save(job.path, format="PNG", compress_level=6, optimize=False)


# --------------------------------------------------------------------------- metadata


def _rng(seed: int, *spawn_key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=spawn_key)))


def _key(name: str) -> int:
    """A stable integer for a name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _draw_patients(
    rng: np.random.Generator, pop: Population, n: int, logit_shift: float
) -> pd.DataFrame:
    """n patients: age (1 decimal), sex, ethnicity, latent disease severity (0 = healthy)."""
    lo, hi = pop.age_range
    age = np.round(np.clip(rng.normal(pop.age_mean, pop.age_sd, n), lo, hi), 1)
    sex = np.where(rng.random(n) < pop.female, "F", "M")
    names = list(pop.ethnicity)
    probs = np.array([pop.ethnicity[e] for e in names])
    ethnicity = rng.choice(names, size=n, p=probs / probs.sum())
    logit = pop.disease_logit + logit_shift + _AGE_RISK * (age - 55.0) / 10.0
    diseased = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    # Severity does not depend on age: an age effect on how well disease is seen must come from
    # effects.age_visibility alone, so that every knob at 0 plants nothing.
    sev = np.clip(rng.beta(1.3, 1.6, n), 0.05, 1.0)
    severity = np.where(diseased, sev, 0.0)
    return pd.DataFrame({"age": age, "sex": sex, "ethnicity": ethnicity, "severity": severity})


def _image_counts(rng: np.random.Generator, total: int, lo: int, hi: int) -> np.ndarray:
    """Images per patient in [lo, hi] summing to exactly ``total``."""
    counts = rng.integers(lo, hi + 1, size=total // lo + 1)
    n = int(np.searchsorted(np.cumsum(counts), total)) + 1
    counts = counts[:n].copy()
    excess = int(counts.sum()) - total
    for i in range(n - 1, -1, -1):  # trim the overshoot without leaving anyone below lo
        cut = min(excess, int(counts[i]) - lo)
        counts[i] -= cut
        excess -= cut
    counts[-1] -= excess  # only when lo == hi and total is not a multiple of it
    return counts[counts > 0]


def _expand_images(
    rng: np.random.Generator, patients: pd.DataFrame, counts: np.ndarray, cameras: tuple[str, str]
) -> pd.DataFrame:
    """One row per image of each patient: eye (alternating), camera, per-image severity."""
    rows = patients.loc[patients.index.repeat(counts)].reset_index(drop=True)
    first_eye = rng.integers(0, 2, len(counts))
    nth = np.concatenate([np.arange(k) for k in counts]) if len(counts) else np.array([], int)
    eye_bit = (np.repeat(first_eye, counts) + nth) % 2
    rows["eye"] = np.where(eye_bit == 0, "L", "R")
    rows["camera_index"] = (rng.random(len(rows)) >= _CAMERA_SHARE[0]).astype(int)
    rows["camera"] = [cameras[i] for i in rows["camera_index"]]
    jitter = rng.normal(0.0, 0.05, len(rows))
    jittered = np.clip(rows["severity"] + jitter, 0.05, 1.0)
    rows["severity"] = np.where(rows["severity"] > 0, jittered, 0.0)
    return rows


def _assign_splits(
    rng: np.random.Generator, n_patients: int, fractions: tuple[float, float, float]
) -> np.ndarray:
    """train/val/test per patient (never per image, so no patient leaks across splits)."""
    n_train = round(fractions[0] * n_patients)
    n_val = min(round(fractions[1] * n_patients), n_patients - n_train)
    splits = np.array(["test"] * n_patients, dtype=object)
    order = rng.permutation(n_patients)
    splits[order[:n_train]] = "train"
    splits[order[n_train : n_train + n_val]] = "val"
    return splits


@dataclass(frozen=True)
class _SiteTables:
    pool: pd.DataFrame | None  # rows of the site's pre-training pool (None: not written)
    tasks: dict[str, pd.DataFrame]


def _site_tables(cfg: SyntheticSettings, site: str, with_pool: bool) -> _SiteTables:
    """All metadata rows drawn from one site's population: its tasks' held-out patients (who also
    have other images in the pool, as in a hospital archive) and pool-only patients."""
    rng = _rng(cfg.seed, _key(site))
    archetype = cfg.sites[site]
    pop, cameras = site_population(archetype, cfg.effects), STYLES[archetype].models
    lo, hi = cfg.images_per_patient
    task_names = [t for t, spec in cfg.tasks.items() if spec.source_site == site]

    groups: list[tuple[str, pd.DataFrame]] = []  # (task name or "", patients)
    task_images: dict[str, pd.DataFrame] = {}
    for name in task_names:
        spec = cfg.tasks[name]
        counts = _image_counts(rng, spec.images, lo, hi)
        patients = _draw_patients(rng, pop, len(counts), _TASK_ENRICHMENT)
        patients["split"] = _assign_splits(rng, len(patients), cfg.split_fractions)
        rows = _expand_images(rng, patients, counts, cameras)
        rows["patient"] = np.repeat(np.arange(len(patients)), counts)
        task_images[name] = rows
        groups.append((name, patients))

    pool_parts: list[pd.DataFrame] = []
    if with_pool:
        for name, patients in groups:
            counts = rng.integers(lo, hi + 1, len(patients))
            part = _expand_images(rng, patients, counts, cameras)
            part["patient"] = np.repeat(np.arange(len(patients)), counts)
            part["group"] = name
            pool_parts.append(part)
        held = sum(len(p) for p in pool_parts)
        if held > cfg.site_images:
            raise ValueError(
                f"synthetic.site_images={cfg.site_images} for site {site!r} is too small: the "
                f"held-out patients of its tasks {task_names} already have {held} pool images"
            )
        if held < cfg.site_images:
            counts = _image_counts(rng, cfg.site_images - held, lo, hi)
            patients = _draw_patients(rng, pop, len(counts), 0.0)
            part = _expand_images(rng, patients, counts, cameras)
            part["patient"] = np.repeat(np.arange(len(patients)), counts)
            part["group"] = ""
            pool_parts.append(part)
            groups.append(("", patients))

    # Patient ids are a random permutation, so an id says nothing about task membership.
    n_total = sum(len(p) for _, p in groups)
    numbers = rng.permutation(n_total)
    ids: dict[str, np.ndarray] = {}
    start = 0
    for name, patients in groups:
        ids[name] = np.array([f"{site}-P{k:06d}" for k in numbers[start : start + len(patients)]])
        start += len(patients)

    tasks = {}
    for name in task_names:
        rows = task_images[name]
        rows["patient_id"] = ids[name][rows["patient"].to_numpy()]
        tasks[name] = rows
    pool = None
    if with_pool:
        pool = pd.concat(pool_parts, ignore_index=True)
        pairs = zip(pool["group"], pool["patient"], strict=True)
        pool["patient_id"] = [ids[group][k] for group, k in pairs]
        pool = pool.iloc[rng.permutation(len(pool))].reset_index(drop=True)  # archive order
    return _SiteTables(pool, tasks)


# --------------------------------------------------------------------------- writing


def _jobs(
    cfg: SyntheticSettings, set_key: str, site: str, rows: pd.DataFrame, folder: Path
) -> list[RenderJob]:
    effects = cfg.effects
    styles = [camera_style(cfg.sites[site], i, effects.site_style) for i in range(2)]
    haze = float(effects.alignment.get(site, 0.0))
    return [
        RenderJob(
            path=str(folder / path),
            spawn_key=(_key(set_key), i),
            seed=cfg.seed,
            size=cfg.image_size,
            style=styles[cam],
            pigment=rendered_pigment(eth, effects),
            eye=eye,
            severity=float(sev),
            contrast=lesion_contrast(float(age), sex, eth, effects),
            haze=haze,
            raw_photo=cfg.raw_photos,
        )
        for i, (path, cam, eth, eye, sev, age, sex) in enumerate(
            zip(
                rows["path"],
                rows["camera_index"],
                rows["ethnicity"],
                rows["eye"],
                rows["severity"],
                rows["age"],
                rows["sex"],
                strict=True,
            )
        )
    ]


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False, float_format="%.1f", lineterminator="\n")


def generate_dataset(
    cfg: SyntheticSettings,
    pretrain_sites: list[str],
    out: Path,
    *,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, int]:
    """Write the synthetic raw data set below ``out``; returns images per written set.

    Writes ``out/sites/<site>/`` for each of ``pretrain_sites`` and ``out/tasks/<task>/`` for
    each task in ``cfg.tasks`` (``metadata.csv`` + ``images/*.png``), keyed ``"sites/<site>"``
    and ``"tasks/<task>"`` in the result. Each set is built in a staging folder and moved into
    place at the end, replacing an older copy, so an interrupted run leaves no half-written set.
    """
    unknown = [s for s in pretrain_sites if s not in cfg.sites]
    if unknown:
        raise ValueError(f"pretrain sites {unknown} are not in synthetic.sites {sorted(cfg.sites)}")
    out = Path(out)
    staging = out / f".staging-{_key(str(out.resolve())) % 10**8}"
    if staging.exists():
        shutil.rmtree(staging)

    wanted = list(dict.fromkeys([*pretrain_sites, *(t.source_site for t in cfg.tasks.values())]))
    sets: list[tuple[str, pd.DataFrame, list[str]]] = []  # (set key, frame, columns)
    jobs: list[RenderJob] = []
    for site in wanted:
        tables = _site_tables(cfg, site, with_pool=site in pretrain_sites)
        site_sets = []
        if tables.pool is not None:
            frame = tables.pool
            frame["image_id"] = [f"{site}-{i:06d}" for i in range(len(frame))]
            frame["diagnosis"] = [DIAGNOSES[grade(v, len(DIAGNOSES))] for v in frame["severity"]]
            site_sets.append((f"sites/{site}", frame, SITE_COLUMNS))
        for task, frame in tables.tasks.items():
            classes = cfg.tasks[task].classes
            frame["image_id"] = [f"{task}-{i:06d}" for i in range(len(frame))]
            frame["label"] = [str(grade(v, classes)) for v in frame["severity"]]
            frame["source_site"] = site
            site_sets.append((f"tasks/{task}", frame, TASK_COLUMNS))
        for key, frame, _ in site_sets:
            frame["path"] = [f"images/{i}.png" for i in frame["image_id"]]
            (staging / key / "images").mkdir(parents=True, exist_ok=True)
            jobs.extend(_jobs(cfg, key, site, frame, staging / key))
        sets.extend(site_sets)

    bar = tqdm(total=len(jobs), desc="synthetic images", unit="img", disable=not progress)
    if workers <= 1:
        for job in jobs:
            _render_and_write(job)
            bar.update()
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_and_write, jobs, chunksize=32):
                bar.update()
    bar.close()

    counts: dict[str, int] = {}
    for key, frame, columns in sets:
        _write_csv(frame[columns], staging / key / "metadata.csv")
        final = out / key
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        (staging / key).rename(final)
        counts[key] = len(frame)
    shutil.rmtree(staging)
    return counts
