"""Data cards: what each FM was pre-trained on, as carefully reported as what it was tested on.

The study's third finding is a call for transparency about pre-training data, so every cohort
ships a card: who is in it (age, sex, ethnicity, eye), how it was imaged (camera, image size and
quality on a seeded sample), how much disease it holds, where it came from (the data's DVC hash)
and how it was drawn (settings and sampling report). ``card.json`` is for machines (MLflow,
comparisons); ``card.md`` with PNG plots is for people.

Definitions:

* Disease prevalence, from ``diagnosis``: a number is a grade, diseased when > 0; text is diseased
  unless it is one of :data:`HEALTHY` (``normal``, ``none``, ``no DR``, ...; case and surrounding
  spaces ignored); an empty or missing diagnosis is
  *unknown* and left out of the denominator (its count is reported).
* Image statistics are on a seeded sample of ``image_sample`` images, each read in greyscale and
  shrunk to at most ``ANALYSIS_SIDE`` px on its longer side, so sharpness compares across cameras
  at one scale: brightness = mean grey level (0-255, black fundus border included), contrast = its
  standard deviation, sharpness = variance of the 4-neighbour Laplacian. Width and height are the
  file's own. An unreadable image is counted and named, not fatal: validation owns that error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from retfm.cohorts.sampling import site_rng
from retfm.data.schema import age_band_labels, age_bands

ANALYSIS_SIDE = 512
CARD_VERSION = 1
CATEGORICAL = ("sex", "ethnicity", "camera", "eye")
PLOTTED = ("sex", "ethnicity", "camera", "eye")
_AGE_BIN_WIDTH = 10.0
#: Diagnosis texts that mean "no disease" (case and surrounding spaces ignored): grading
#: exports write ``normal``, ``none`` (as the built-in data does), ``no DR``, ``healthy``.
HEALTHY = frozenset({"normal", "none", "no dr", "no_dr", "no disease", "healthy"})


def build_card(
    cohort: pd.DataFrame,
    *,
    site: str,
    report: Mapping[str, Any],
    data_hash: str,
    settings_snapshot: Mapping[str, Any],
    image_root: Path,
    image_sample: int = 200,
    seed: int = 0,
    replicate: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-serialisable data card for one site's cohort (see module docstring);
    ``replicate``: which of the site's replicate cohorts this is (name, index, seed)."""
    age_edges = [float(e) for e in report.get("age_edges", [])]
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "kind": "retfm pre-training cohort",
        "site": site,
        "intended_use": (
            f"Self-supervised pre-training of the {site!r} foundation model; one of several "
            "equal-size cohorts whose only intended difference is the site."
        ),
        "size": _size_section(cohort),
        "age": _age_section(cohort, age_edges),
        "distributions": {
            col: _distribution(cohort[col]) for col in CATEGORICAL if col in cohort.columns
        },
        "disease": _disease_section(cohort),
        "images": _image_section(cohort, Path(image_root), image_sample, seed, site),
        "data": {"dvc_hash": data_hash},
        "sampling": {"settings": dict(settings_snapshot), "report": dict(report)},
    }
    if replicate is not None:
        card["replicate"] = dict(replicate)
    return _jsonable(card)


def write_card(card: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``card.json``, ``card.md`` and PNG plots into ``out_dir``; name -> path written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    json_path = out_dir / "card.json"
    json_path.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    written["card.json"] = json_path
    plots = _write_plots(card, out_dir)
    written.update({p.name: p for p in plots.values()})
    md_path = out_dir / "card.md"
    md_path.write_text(_markdown(card, {k: p.name for k, p in plots.items()}))
    written["card.md"] = md_path
    return written


# ------------------------------------------------------------------------------------ sections


def _size_section(cohort: pd.DataFrame) -> dict[str, Any]:
    per_patient = cohort.groupby("patient_id", sort=True).size()
    counts = per_patient.value_counts().sort_index()
    return {
        "images": int(len(cohort)),
        "patients": int(len(per_patient)),
        "images_per_patient": {
            **_summary(per_patient.to_numpy(dtype=float)),
            "counts": {str(int(k)): int(v) for k, v in counts.items()},
        },
    }


def _age_section(cohort: pd.DataFrame, age_edges: list[float]) -> dict[str, Any]:
    age = cohort["age"].to_numpy(dtype=float)
    known = age[~np.isnan(age)]
    top = max(
        120.0, math.ceil((known.max() if known.size else 0) / _AGE_BIN_WIDTH) * _AGE_BIN_WIDTH
    )
    edges = np.arange(0.0, top + _AGE_BIN_WIDTH, _AGE_BIN_WIDTH)
    hist, _ = np.histogram(np.clip(known, 0.0, None), bins=edges)
    bands = pd.Series(age_bands(age, age_edges)).value_counts()
    band_order = [*age_band_labels(age_edges), "unknown"]
    return {
        "summary": {**_summary(known), "missing": int(np.isnan(age).sum())},
        "histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
        "bands": {b: int(bands.get(b, 0)) for b in band_order if b != "unknown" or b in bands},
        "band_edges": age_edges,
    }


def _distribution(values: pd.Series) -> dict[str, Any]:
    """Counts and shares per level, most frequent first (ties by name, so the order is stable)."""
    raw = values.astype("string").fillna("unknown").value_counts()
    items = sorted(((str(k), int(v)) for k, v in raw.items()), key=lambda kv: (-kv[1], kv[0]))
    total = sum(v for _, v in items)
    return {
        "counts": dict(items),
        "shares": {k: round(v / total, 6) for k, v in items} if total else {},
    }


def _disease_section(cohort: pd.DataFrame) -> dict[str, Any] | None:
    if "diagnosis" not in cohort.columns:
        return None
    text = cohort["diagnosis"].astype("string").str.strip()
    unknown = (text.isna() | (text == "")).to_numpy()
    grade = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
    is_grade = ~np.isnan(grade) & ~unknown
    is_text = ~is_grade & ~unknown
    diseased = (is_grade & (grade > 0)) | (
        is_text & ~text.str.lower().isin(HEALTHY).fillna(False).to_numpy()
    )
    known = int((~unknown).sum())
    top = text[~unknown].value_counts().head(10)
    return {
        "rule": "grade > 0, or text other than normal / none / no DR / healthy; empty = unknown "
        "(not in denominator)",
        "known": known,
        "unknown": int(unknown.sum()),
        "diseased": int(diseased.sum()),
        "prevalence": round(int(diseased.sum()) / known, 6) if known else None,
        "top_diagnoses": {str(k): int(v) for k, v in top.items()},
    }


def _image_section(
    cohort: pd.DataFrame, image_root: Path, image_sample: int, seed: int, site: str
) -> dict[str, Any] | None:
    if "path" not in cohort.columns or image_sample <= 0 or len(cohort) == 0:
        return None
    ordered = cohort.sort_values("image_id", kind="stable")["path"].astype(str).to_numpy()
    n = min(image_sample, len(ordered))
    picked = np.sort(site_rng(seed, site, 1).choice(len(ordered), size=n, replace=False))
    rows: list[tuple[float, ...]] = []
    unreadable: list[str] = []
    for rel in ordered[picked]:
        stats = image_stats(image_root / rel)
        if stats is None:
            unreadable.append(rel)
        else:
            rows.append(stats)
    table = np.array(rows, dtype=float).reshape(-1, 5)
    names = ("width", "height", "brightness", "contrast", "sharpness")
    return {
        "sampled": n,
        "seed": seed,
        "analysis_side": ANALYSIS_SIDE,
        "readable": len(rows),
        "unreadable": {"count": len(unreadable), "examples": unreadable[:5]},
        **{name: _summary(table[:, i]) for i, name in enumerate(names)},
    }


def image_stats(path: Path) -> tuple[float, float, float, float, float] | None:
    """(width, height, brightness, contrast, sharpness) of one image; None when unreadable."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            img.draft("L", (ANALYSIS_SIDE, ANALYSIS_SIDE))  # JPEG: decode at reduced scale
            grey = img.convert("L")
    except (OSError, ValueError):
        return None
    grey.thumbnail((ANALYSIS_SIDE, ANALYSIS_SIDE))
    a = np.asarray(grey, dtype=np.float32)
    if min(a.shape) < 3:
        return float(width), float(height), float(a.mean()), float(a.std()), 0.0
    lap = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4.0 * a[1:-1, 1:-1]
    return float(width), float(height), float(a.mean()), float(a.std()), float(lap.var())


def _summary(values: np.ndarray) -> dict[str, float | int | None]:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"n": 0, "mean": None, "sd": None, "min": None, "median": None, "max": None}
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return {
        "n": int(values.size),
        "mean": round(float(values.mean()), 4),
        "sd": round(float(values.std(ddof=1)), 4) if values.size > 1 else None,
        "min": round(float(values.min()), 4),
        "q25": round(float(q25), 4),
        "median": round(float(q50), 4),
        "q75": round(float(q75), 4),
        "max": round(float(values.max()), 4),
    }


def _jsonable(value: Any) -> Any:
    """Plain JSON types only (numpy scalars, paths, tuples converted; NaN/inf -> None)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.integer | bool | np.bool_):
        return bool(value) if isinstance(value, bool | np.bool_) else int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return value.as_posix()
    if value is None or isinstance(value, str | int):
        return value
    return str(value)


# --------------------------------------------------------------------------------------- plots


def _write_plots(card: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """One PNG per plot; drawn on bare Figures (Agg canvas), no pyplot global state."""
    plots: dict[str, Path] = {}
    hist = card["age"]["histogram"]
    if sum(hist["counts"]):
        fig = Figure(figsize=(6, 3.2), layout="constrained")
        ax = fig.add_subplot()
        edges = np.asarray(hist["edges"])
        ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", edgecolor="white")
        ax.set(xlabel="age (years)", ylabel="images", title=f"{card['site']}: age")
        plots["age"] = _save(fig, out_dir / "age_hist.png")
    for col in PLOTTED:
        dist = card["distributions"].get(col)
        if not dist or not dist["counts"]:
            continue
        labels, counts = list(dist["counts"])[::-1], list(dist["counts"].values())[::-1]
        fig = Figure(figsize=(6, 0.6 + 0.35 * len(labels)), layout="constrained")
        ax = fig.add_subplot()
        ax.barh(labels, counts)
        total = sum(counts)
        for y, c in enumerate(counts):
            ax.text(c, y, f" {c} ({100 * c / total:.1f}%)", va="center", fontsize=8)
        ax.set_xlim(0, max(counts) * 1.3)
        ax.set(xlabel="images", title=f"{card['site']}: {col}")
        plots[col] = _save(fig, out_dir / f"{col}.png")
    return plots


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


# ------------------------------------------------------------------------------------ markdown


def _markdown(card: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    report = card["sampling"]["report"]
    size = card["size"]
    ipp = size["images_per_patient"]
    lines = [
        f"# Data card: pre-training cohort `{card['site']}`",
        "",
        card["intended_use"],
        "",
        "| field | value |",
        "|---|---|",
        f"| site | {card['site']} |",
        f"| images | {size['images']} |",
        f"| patients | {size['patients']} |",
        f"| images per patient | mean {ipp['mean']}, min {ipp['min']}, max {ipp['max']} |",
        f"| strategy | {report.get('strategy', '?')} (seed {report.get('seed', '?')}) |",
        f"| requested size | {report.get('requested', '?')}"
        + (" (shrunk: allow_smaller)" if report.get("shrunk") else "")
        + " |",
        f"| data (DVC hash) | `{card['data']['dvc_hash']}` |",
        "",
        "## Age",
        "",
        _table(["statistic", "value"], list(card["age"]["summary"].items())),
        "",
        _table(["age band", "images"], list(card["age"]["bands"].items())),
        "",
    ]
    if "age" in plots:
        lines += [f"![age histogram]({plots['age']})", ""]
    for col, dist in card["distributions"].items():
        rows = [(k, v, f"{100 * dist['shares'][k]:.1f}%") for k, v in dist["counts"].items()]
        lines += [f"## {col.capitalize()}", "", _table([col, "images", "share"], rows), ""]
        if col in plots:
            lines += [f"![{col}]({plots[col]})", ""]
    disease = card.get("disease")
    if disease:
        lines += [
            "## Disease",
            "",
            f"Prevalence {disease['prevalence']} ({disease['diseased']} of {disease['known']} "
            f"with a diagnosis; {disease['unknown']} unknown). Rule: {disease['rule']}.",
            "",
            _table(["diagnosis", "images"], list(disease["top_diagnoses"].items())),
            "",
        ]
    images = card.get("images")
    if images:
        names = ("width", "height", "brightness", "contrast", "sharpness")
        stats: list[tuple[Any, ...]] = [
            (n, images[n]["mean"], images[n]["sd"], images[n]["min"], images[n]["max"])
            for n in names
        ]
        lines += [
            "## Images",
            "",
            f"Seeded sample of {images['sampled']} images (seed {images['seed']}), "
            f"{images['readable']} readable, {images['unreadable']['count']} unreadable; "
            f"quality measured at <= {images['analysis_side']} px.",
            "",
            _table(["measure", "mean", "sd", "min", "max"], stats),
            "",
        ]
        if images["unreadable"]["examples"]:
            lines += [
                "Unreadable: " + ", ".join(f"`{p}`" for p in images["unreadable"]["examples"]),
                "",
            ]
    lines += _sampling_markdown(card)
    return "\n".join(lines) + "\n"


def _sampling_markdown(card: Mapping[str, Any]) -> list[str]:
    report = card["sampling"]["report"]
    lines = ["## Sampling", ""]
    if report.get("strata"):
        rows = [
            (s["stratum"], s["eligible_images"], s["target_share"], s["quota"], s["chosen_images"])
            for s in report["strata"]
        ]
        lines += [_table(["stratum", "eligible", "target share", "quota", "chosen"], rows), ""]
    for pair in report.get("balance", {}).get("pairs", []):
        smds: list[tuple[Any, ...]] = [(var, v["smd"]) for var, v in pair["smd"].items()]
        lines += [
            f"Balance, {pair['a']} vs {pair['b']} (SMD):",
            "",
            _table(["variable", "SMD"], smds),
            "",
        ]
    lines += [
        "Settings:",
        "",
        "```json",
        json.dumps(card["sampling"]["settings"], indent=2),
        "```",
    ]
    return lines


def _table(header: list[str], rows: list[tuple[Any, ...]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def _cell(value: Any) -> str:
    return "" if value is None else str(value).replace("|", "\\|")
