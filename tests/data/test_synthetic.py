"""The synthetic generator writes the raw format, deterministically, with its planted effects."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retfm.data import schema
from retfm.data.synthetic import generate_dataset, lesion_contrast
from retfm.settings import EffectSettings, SyntheticSettings


def settings(**overrides: Any) -> SyntheticSettings:
    raw: dict[str, Any] = {
        "seed": 7,
        "image_size": 32,
        "site_images": 36,
        "images_per_patient": [1, 3],
        "sites": {"hospital": "specialist", "screening": "community", "public": "public"},
        "tasks": {
            "hospital_dr": {"source_site": "hospital", "images": 16, "classes": 2},
            "public_dr": {"source_site": "public", "images": 12, "classes": 3},
        },
        "split_fractions": [0.6, 0.2, 0.2],
    }
    raw.update(overrides)
    return SyntheticSettings.model_validate(raw)


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("synthetic")
    counts = generate_dataset(settings(), ["hospital", "screening"], out, workers=2, progress=False)
    return out, counts


def read(out: Path, key: str) -> pd.DataFrame:
    return pd.read_csv(out / key / "metadata.csv", dtype=str, keep_default_na=False)


def test_same_settings_give_identical_bytes_with_one_or_two_workers(generated, tmp_path):
    out, _ = generated
    generate_dataset(settings(), ["hospital", "screening"], tmp_path, workers=1, progress=False)
    first, second = file_hashes(out), file_hashes(tmp_path)
    assert any(name.endswith("metadata.csv") for name in first)
    assert first == second


def test_another_seed_gives_other_images(generated, tmp_path):
    out, _ = generated
    generate_dataset(settings(seed=8), ["hospital"], tmp_path, workers=1, progress=False)
    ours = file_hashes(out / "sites" / "hospital")
    theirs = file_hashes(tmp_path / "sites" / "hospital")
    assert ours.keys() == theirs.keys()
    assert ours != theirs


def test_writes_the_raw_format_for_pretraining_sites_and_every_task(generated):
    out, counts = generated
    assert counts == {
        "sites/hospital": 36,
        "sites/screening": 36,
        "tasks/hospital_dr": 16,
        "tasks/public_dr": 12,
    }
    assert sorted(p.name for p in (out / "sites").iterdir()) == ["hospital", "screening"]
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["hospital_dr", "public_dr"]
    assert not list(out.glob(".staging*"))
    site_columns = list(schema.SITE_REQUIRED) + list(schema.SITE_OPTIONAL)
    task_columns = list(schema.TASK_REQUIRED) + list(schema.TASK_OPTIONAL)
    for key, n in counts.items():
        frame = read(out, key)
        expected = site_columns if key.startswith("sites/") else task_columns
        assert sorted(frame.columns) == sorted(expected)
        assert len(frame) == n and frame["image_id"].is_unique
        assert set(frame["sex"]) <= set(schema.SEX)
        assert set(frame["ethnicity"]) <= set(schema.ETHNICITY)
        assert set(frame["eye"]) <= set(schema.EYE)
        assert all(len(a.split(".")[1]) == 1 for a in frame["age"])  # one decimal
        assert frame["camera"].nunique() <= 2
        for rel in frame["path"].head(3):
            with Image.open(out / key / rel) as img:
                assert (img.mode, img.size) == ("RGB", (32, 32))
        assert len(list((out / key / "images").glob("*.png"))) == n


def test_images_per_patient_stay_in_range(generated):
    out, counts = generated
    for key in counts:
        per_patient = read(out, key).groupby("patient_id").size()
        assert per_patient.between(1, 3).all(), key


def test_task_patients_also_have_other_images_in_their_site_pool(generated):
    out, _ = generated
    task, pool = read(out, "tasks/hospital_dr"), read(out, "sites/hospital")
    assert set(task["patient_id"]) <= set(pool["patient_id"])
    assert not set(task["image_id"]) & set(pool["image_id"])
    assert (task["source_site"] == "hospital").all()
    public = read(out, "tasks/public_dr")
    assert (public["source_site"] == "public").all()
    assert not set(public["patient_id"]) & set(pool["patient_id"])


def test_splits_are_assigned_by_patient(generated):
    out, _ = generated
    for task in ("hospital_dr", "public_dr"):
        frame = read(out, f"tasks/{task}")
        assert (frame.groupby("patient_id")["split"].nunique() == 1).all()
        assert set(frame["split"]) == set(schema.SPLITS)


def test_labels_are_grades_in_range(generated):
    out, _ = generated
    assert set(read(out, "tasks/hospital_dr")["label"]) <= {"0", "1"}
    assert set(read(out, "tasks/public_dr")["label"]) <= {"0", "1", "2"}


def site_mean_colours(out: Path, site: str) -> np.ndarray:
    frame = read(out, f"sites/{site}")
    pixels = np.stack([np.asarray(Image.open(out / f"sites/{site}" / p)) for p in frame["path"]])
    inside = pixels.reshape(-1, 3)
    inside = inside[inside.sum(1) > 0]  # field of view only
    return inside.mean(0)


def test_site_style_knob_controls_the_acquisition_gap(tmp_path):
    gaps = {}
    for style in (0.0, 1.0):
        out = tmp_path / str(style)
        cfg = settings(tasks={}, effects={"site_style": style}, site_images=30)
        generate_dataset(cfg, ["hospital", "screening"], out, workers=1, progress=False)
        gap = site_mean_colours(out, "hospital") - site_mean_colours(out, "screening")
        gaps[style] = float(np.abs(gap).max())
    assert gaps[0.0] < 12.0  # grey levels: only population differences remain
    assert gaps[1.0] > 3 * gaps[0.0]


@pytest.mark.parametrize(
    ("knob", "unaffected"),
    [
        ({"age_visibility": 0.8}, lambda row: float(row.age) <= 30.0),
        ({"sex": 0.5}, lambda row: row.sex == "M"),
    ],
)
def test_visibility_knobs_change_only_the_affected_images(tmp_path, knob, unaffected):
    """Same seed, knob off vs on: unaffected patients' images are byte-identical, and images
    showing disease in the affected group change (lesions fade)."""
    task = {"t": {"source_site": "screening", "images": 60, "classes": 2}}
    for name, effects in (("off", {}), ("on", knob)):
        cfg = settings(tasks=task, effects=effects, image_size=24)
        generate_dataset(cfg, [], tmp_path / name, workers=1, progress=False)
    off, on = file_hashes(tmp_path / "off"), file_hashes(tmp_path / "on")
    frame = read(tmp_path / "off", "tasks/t")
    same = [off[f"tasks/t/{r.path}"] == on[f"tasks/t/{r.path}"] for r in frame.itertuples()]
    frame["same"] = same
    frame["unaffected"] = [bool(unaffected(r)) for r in frame.itertuples()]
    assert frame["unaffected"].any()
    assert frame.loc[frame["unaffected"], "same"].all()
    affected_sick = frame[~frame["unaffected"] & (frame["label"] != "0")]
    assert not affected_sick["same"].all()


def test_lesion_contrast_falls_with_age_only_when_planted():
    none, planted = EffectSettings(age_visibility=0.0), EffectSettings(age_visibility=0.6)
    assert lesion_contrast(80, "F", "white", none) == lesion_contrast(30, "F", "white", none)
    assert lesion_contrast(80, "F", "white", planted) == pytest.approx(0.4)
    assert lesion_contrast(30, "F", "white", planted) == 1.0


def test_diseased_images_show_more_lesion_colour(generated):
    """The label is visible: exudate-yellow pixels are commoner in grade > 0 images."""
    out, _ = generated
    frame = read(out, "tasks/public_dr")

    def yellow_share(rel: str) -> float:
        px = np.asarray(Image.open(out / "tasks/public_dr" / rel)).astype(int)
        return float(((px[..., 1] > 150) & (px[..., 0] > 180)).mean())

    share = frame["path"].map(yellow_share)
    sick, healthy = share[frame["label"] != "0"], share[frame["label"] == "0"]
    assert len(sick) and len(healthy)
    assert sick.mean() > healthy.mean()


def test_unknown_pretrain_site_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'clinic'"):
        generate_dataset(settings(), ["clinic"], tmp_path, progress=False)


def test_pool_too_small_for_held_out_patients_is_refused(tmp_path):
    cfg = settings(site_images=4)
    with pytest.raises(ValueError, match="site_images=4 for site 'hospital' is too small"):
        generate_dataset(cfg, ["hospital"], tmp_path, progress=False)


def test_population_knob_at_zero_gives_every_site_the_same_people():
    from retfm.data.synthetic import POPULATIONS, site_population

    same = [site_population(a, EffectSettings(population=0.0)) for a in POPULATIONS]
    assert all(p == same[0] for p in same)
    assert site_population("specialist", EffectSettings()) == POPULATIONS["specialist"]
    half = site_population("community", EffectSettings(population=0.5))
    assert same[0].disease_logit > half.disease_logit > POPULATIONS["community"].disease_logit


def test_alignment_knob_lowers_the_contrast_of_the_listed_sites_photographs(tmp_path):
    cfg = settings(
        sites={"hospital": "public", "screening": "public", "public": "public"},
        effects={"site_style": 0.0, "alignment": {"hospital": 1.0}},
    )
    generate_dataset(cfg, ["hospital", "screening"], tmp_path, workers=2, progress=False)

    def contrast(site: str) -> float:
        meta = read(tmp_path, f"sites/{site}")
        sds = []
        for path in meta["path"][:20]:
            img = np.asarray(Image.open(tmp_path / "sites" / site / path), dtype=float)
            c = np.arange(img.shape[0]) - (img.shape[0] - 1) / 2
            centre = c[:, None] ** 2 + c[None, :] ** 2 < (0.3 * img.shape[0]) ** 2
            sds.append(img[centre].std(axis=0).mean())  # inside the field of view
        return float(np.mean(sds))

    assert contrast("hospital") < 0.75 * contrast("screening")  # HAZE_LOSS 0.5, plus noise


def test_raw_photos_are_deterministic_rectangles_around_the_same_metadata(generated, tmp_path):
    out, _ = generated
    sites = ["hospital", "screening"]
    generate_dataset(settings(raw_photos=True), sites, tmp_path / "a", workers=1, progress=False)
    generate_dataset(settings(raw_photos=True), sites, tmp_path / "b", workers=2, progress=False)
    first, second, square = (file_hashes(p) for p in (tmp_path / "a", tmp_path / "b", out))
    assert first == second  # same seed, same bytes, whatever the worker count
    assert sorted(first) == sorted(square)
    csvs = [name for name in first if name.endswith("metadata.csv")]
    assert csvs and all(first[name] == square[name] for name in csvs)
    pngs = [name for name in first if name.endswith(".png")]
    assert not any(first[name] == square[name] for name in pngs)
    shapes = set()
    for name in pngs:
        with Image.open(tmp_path / "a" / name) as img:
            shapes.add(img.size)
    assert shapes == {(43, 32), (48, 32)}  # 4:3 and 3:2 at image_size 32


def test_raw_photos_pack_like_the_square_renderings_after_the_fundus_crop(generated, tmp_path):
    from retfm.data.fundus import find_fov
    from retfm.data.shards import pack_images

    out, _ = generated
    generate_dataset(settings(raw_photos=True), ["hospital"], tmp_path, workers=2, progress=False)
    meta = read(out, "sites/hospital")
    kw = {"image_size": 24, "shard_size": 64, "progress": False, "fundus_crop": True}
    square = pack_images(meta, out / "sites/hospital", tmp_path / "p0", **kw)
    raw = pack_images(meta, tmp_path / "sites/hospital", tmp_path / "p1", **kw)
    a = square.take(np.arange(len(meta))).astype(float)
    b = raw.take(np.arange(len(meta))).astype(float)
    diff = np.abs(a - b).mean(axis=(1, 2, 3))
    clipped = []
    for path in meta["path"]:
        with Image.open(tmp_path / "sites/hospital" / path) as img:
            fov = find_fov(np.asarray(img))
        clipped.append(fov.width - fov.height > 1)
    clipped_ = np.array(clipped)
    assert 0 < clipped_.sum() < len(meta)  # some photos lose the top or bottom of the circle
    # unclipped: the same retina pixels; only the border noise (0-8) in the square's corners
    # differs. Clipped: the rows cut off are black.
    assert diff[~clipped_].max() < 1.0, diff[~clipped_]
    assert diff.mean() < 1.5, diff.mean()
    unclipped, cut = diff[~clipped_].mean(), diff[clipped_].mean()
    print(f"mean abs diff: unclipped {unclipped:.3f}, clipped {cut:.3f}, all {diff.mean():.3f}")
