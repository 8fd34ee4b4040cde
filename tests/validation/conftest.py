"""Tiny raw data folders written per test: two sites and one task, a few 40 px PNGs each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from retfm.settings import Settings, parse_settings

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
SITE_HEADER = "image_id,patient_id,path,age,sex,ethnicity,eye,camera"
TASK_HEADER = "image_id,patient_id,path,label,split,source_site,age,sex"
KEY = "5f" * 32  # a test key (hex)


def write_png(path: Path, side: int = 40, mode: str = "RGB", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    shape = (side, side, 3) if mode == "RGB" else (side, side)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(path)
    return path


@pytest.fixture
def png() -> Callable[..., Path]:
    """``png(path, side=40, mode="RGB", seed=0)`` writes a noise PNG."""
    return write_png


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    raw = yaml.safe_load(PARAMS.read_text())
    raw["study"]["sites"] = ["hospital", "screening"]
    raw["study"]["tasks"] = ["hospital_dr"]
    raw["validation"].update(min_image_side=32, check_images=True, workers=2, max_report_rows=5)
    # the tables' ids are not the synthetic data's, so a site key, as a hospital would have it
    (tmp_path / "site.key").write_text(KEY + "\n")
    raw["privacy"] = {"pseudonym_key": f"file:{tmp_path / 'site.key'}"}
    return parse_settings(raw)


def _site_rows(site: str, n: int) -> list[str]:
    sexes, eyes = ["F", "M"], ["L", "R"]
    return [
        f"{site}{i},{site}p{i // 2},images/{site}{i}.png,{30 + 5 * i},{sexes[i % 2]},white,"
        f"{eyes[i % 2]},cam"
        for i in range(n)
    ]


def _task_rows(n: int) -> list[str]:
    # pairs of one image per class: train, train, val, test (every split holds both classes)
    splits = ["train", "train", "val", "test"]
    return [
        f"t{i},tp{i},images/t{i}.png,{i % 2},{splits[(i // 2) % 4]},hospital,{40 + i},{'FM'[i % 2]}"
        for i in range(n)
    ]


@pytest.fixture
def make_data(tmp_path: Path) -> Callable[..., Path]:
    """Write ``data/`` with valid tables; ``site_rows`` / ``task_rows`` replace a table's rows."""

    def make(
        site_rows: dict[str, list[str]] | None = None, task_rows: list[str] | None = None
    ) -> Path:
        root = tmp_path / "data"
        tables = {
            root / "sites" / s / "metadata.csv": (SITE_HEADER, _site_rows(s, 8))
            for s in ("hospital", "screening")
        }
        tables[root / "tasks" / "hospital_dr" / "metadata.csv"] = (TASK_HEADER, _task_rows(8))
        for site, rows in (site_rows or {}).items():
            tables[root / "sites" / site / "metadata.csv"] = (SITE_HEADER, rows)
        if task_rows is not None:
            tables[root / "tasks" / "hospital_dr" / "metadata.csv"] = (TASK_HEADER, task_rows)
        for csv_path, (header, rows) in tables.items():
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            csv_path.write_text("\n".join([header, *rows]) + "\n")
            for seed, row in enumerate(rows):
                rel = row.split(",")[2]
                if rel.endswith(".png") and ".." not in rel and not rel.startswith("/"):
                    write_png(csv_path.parent / rel, seed=seed)
        return root

    return make
