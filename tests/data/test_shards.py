"""Packing decodes each image once into uint8 shards; PackedSet reads them back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from retfm.data.fundus import fundus_square
from retfm.data.images import ImageSource
from retfm.data.shards import PackedSet, PackedSetError, PackError, load_image, pack_images

SIZE = 16
SHAPES = [(40, 30), (30, 50), (24, 24), (64, 20), (33, 47), (20, 20), (50, 41)]  # (w, h)


def reference(path: Path) -> np.ndarray:
    """The documented rule, from an independent implementation: torchvision's transforms."""
    transform = transforms.Compose(
        [transforms.Resize(SIZE, InterpolationMode.BICUBIC), transforms.CenterCrop(SIZE)]
    )
    with Image.open(path) as img:
        return np.asarray(transform(img.convert("RGB")))


@pytest.fixture()
def images(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    rng = np.random.default_rng(0)
    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (w, h) in enumerate(SHAPES):
        rel = f"images/img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / rel)
        rows.append({"image_id": f"id{i}", "path": rel, "label": str(i % 2)})
    return root, pd.DataFrame(rows)


def test_roundtrip_over_several_shards_in_any_order(images, tmp_path):
    root, meta = images
    packed = pack_images(
        meta, root, tmp_path / "packed", image_size=SIZE, shard_size=3, progress=False
    )
    assert isinstance(packed, ImageSource)
    assert len(packed) == len(SHAPES) and packed.image_size == SIZE
    assert sorted(p.name for p in (tmp_path / "packed").glob("shard_*.npy")) == [
        "shard_00000.npy",
        "shard_00001.npy",
        "shard_00002.npy",
    ]
    order = np.array([6, 0, 3, 3, 5, 1])
    got = packed.take(order)
    assert got.dtype == np.uint8 and got.shape == (len(order), SIZE, SIZE, 3)
    for row, i in zip(got, order, strict=True):
        np.testing.assert_array_equal(row, reference(root / meta["path"][i]))


def test_index_keeps_metadata_and_manifest_has_statistics(images, tmp_path):
    root, meta = images
    packed = pack_images(
        meta, root, tmp_path / "packed", image_size=SIZE, shard_size=3, progress=False
    )
    index = packed.meta
    pd.testing.assert_frame_equal(index[meta.columns.tolist()], meta)
    assert index["shard"].tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert index["offset"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    pixels = packed.take(np.arange(len(packed))).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(packed.mean, pixels.mean(0), atol=1e-5)
    np.testing.assert_allclose(packed.std, pixels.std(0), atol=1e-5)
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    assert manifest["count"] == 7 and manifest["shard_size"] == 3
    assert len(manifest["sha256"]) == 64
    packed.verify()


def test_one_or_two_workers_write_identical_shards(images, tmp_path):
    root, meta = images
    one = pack_images(
        meta, root, tmp_path / "a", image_size=SIZE, shard_size=4, workers=1, progress=False
    )
    two = pack_images(
        meta, root, tmp_path / "b", image_size=SIZE, shard_size=4, workers=2, progress=False
    )
    assert one.fingerprint == two.fingerprint


def test_grayscale_images_become_three_equal_channels(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    gray = np.random.default_rng(1).integers(0, 256, (30, 40), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(root / "g8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(root / "g16.png")  # 16-bit grayscale
    with Image.open(root / "g16.png") as img:
        assert img.mode.startswith("I")
    meta = pd.DataFrame({"path": ["g8.png", "g16.png"]})
    packed = pack_images(meta, root, tmp_path / "p", image_size=SIZE, shard_size=8, progress=False)
    got = packed.take([0, 1])
    expected = reference(root / "g8.png")
    assert (expected[..., 0] == expected[..., 2]).all()
    np.testing.assert_array_equal(got[0], expected)
    np.testing.assert_array_equal(got[1], expected)  # v * 257 scaled back to v


def test_truncated_image_fails_naming_the_file_and_row(images, tmp_path):
    root, meta = images
    broken = root / meta["path"][2]
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(PackError, match=r"img2\.png: cannot decode image \(metadata row 2, "):
        pack_images(meta, root, tmp_path / "p", image_size=SIZE, shard_size=3, progress=False)
    assert not (tmp_path / "p").exists()
    assert not list(tmp_path.glob(".p.tmp-*"))


def test_missing_image_fails_naming_the_file_and_image_id(images, tmp_path):
    root, meta = images
    (root / meta["path"][4]).unlink()
    with pytest.raises(PackError, match=r"img4\.png: image file not found .*image_id=id4"):
        pack_images(meta, root, tmp_path / "p", image_size=SIZE, shard_size=3, progress=False)


def test_repacking_replaces_the_old_set(images, tmp_path):
    root, meta = images
    out = tmp_path / "p"
    pack_images(meta, root, out, image_size=SIZE, shard_size=2, progress=False)
    packed = pack_images(meta.head(3), root, out, image_size=SIZE, shard_size=8, progress=False)
    assert len(packed) == 3
    assert [p.name for p in out.glob("shard_*.npy")] == ["shard_00000.npy"]


def test_missing_or_corrupt_manifest_is_a_clear_error(images, tmp_path):
    root, meta = images
    out = tmp_path / "p"
    with pytest.raises(PackedSetError, match="manifest.json: missing"):
        PackedSet(out)
    pack_images(meta, root, out, image_size=SIZE, shard_size=3, progress=False)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(PackedSetError, match="manifest.json: not valid JSON"):
        PackedSet(out)
    (out / "manifest.json").write_text(json.dumps({"count": 7}))
    with pytest.raises(PackedSetError, match=r"missing key\(s\) \['image_size'"):
        PackedSet(out)


def test_shard_that_does_not_match_the_manifest_is_refused(images, tmp_path):
    root, meta = images
    out = tmp_path / "p"
    pack_images(meta, root, out, image_size=SIZE, shard_size=3, progress=False)
    np.save(out / "shard_00001.npy", np.zeros((3, SIZE, SIZE), np.uint8))
    with pytest.raises(PackedSetError, match=r"shard_00001\.npy: expected uint8"):
        PackedSet(out)


def test_take_out_of_range_is_an_index_error(images, tmp_path):
    root, meta = images
    packed = pack_images(meta, root, tmp_path / "p", image_size=SIZE, shard_size=3, progress=False)
    with pytest.raises(IndexError, match="index 7 out of range"):
        packed.take([0, 7])
    assert packed.take([]).shape == (0, SIZE, SIZE, 3)


# --------------------------------------------------------------------------- pack.fundus_crop


def fundus_photo(w: int, h: int, cx: float, cy: float, r: float, seed: int = 0) -> np.ndarray:
    """A wide photo: shaded orange retina in the circle of radius r at (cx, cy), black border."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (r * r)
    shade = (1.0 - 0.45 * d2) * (1.0 + 0.05 * rng.standard_normal((h, w)))
    img = shade[..., None] * np.array([200.0, 90.0, 40.0])
    img = np.where((d2 < 1.0)[..., None], img, rng.uniform(0.0, 4.0, (h, w, 3)))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def old_load_image(path: Path, image_size: int) -> np.ndarray:
    """load_image as it was before pack.fundus_crop (commit 1cb424b), to compare byte for byte."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft("RGB", (image_size, image_size))
        if img.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
            wide = np.asarray(img, dtype=np.float64)
            rgb = Image.fromarray((wide * (255.0 / 65535.0) + 0.5).clip(0, 255).astype(np.uint8))
            rgb = rgb.convert("RGB")
        else:
            rgb = img.convert("RGB")
    w, h = rgb.size
    s = image_size
    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    left, top = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
    return np.asarray(rgb.crop((left, top, left + s, top + s)), dtype=np.uint8)


def square_reference(pixels: np.ndarray, size: int) -> np.ndarray:
    """Crop + pad (retfm.data.fundus) then torchvision's Resize + CenterCrop, at full size."""
    transform = transforms.Compose(
        [transforms.Resize(size, InterpolationMode.BICUBIC), transforms.CenterCrop(size)]
    )
    return np.asarray(transform(Image.fromarray(fundus_square(pixels))))


@pytest.fixture()
def photos(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    root = tmp_path / "raw"
    root.mkdir()
    Image.fromarray(fundus_photo(300, 200, 112.0, 101.0, 90.0)).save(root / "wide.png")
    Image.fromarray(fundus_photo(1600, 1000, 820.0, 500.0, 480.0, seed=1)).save(
        root / "large.jpg", quality=90
    )
    Image.fromarray(fundus_photo(1600, 1000, 700.0, 520.0, 115.0, seed=2)).save(
        root / "small_fov.jpg", quality=90
    )
    meta = pd.DataFrame(
        {"image_id": ["wide", "large", "small"], "path": ["wide.png", "large.jpg", "small_fov.jpg"]}
    )
    return root, meta


def test_fundus_crop_fills_the_frame_with_the_retina(photos, tmp_path):
    root, meta = photos
    size = SIZE
    kw = {"image_size": size, "shard_size": 8, "progress": False}
    cropped = pack_images(meta, root, tmp_path / "on", fundus_crop=True, **kw).take([0])[0]
    plain = pack_images(meta, root, tmp_path / "off", **kw).take([0])[0]
    red = cropped[..., 0].astype(int)
    corners = [red[0, 0], red[0, -1], red[-1, 0], red[-1, -1]]
    edges = [red[0, size // 2], red[-1, size // 2], red[size // 2, 0], red[size // 2, -1]]
    assert max(corners) < 10, corners  # black outside the circle
    assert min(edges) > 60, edges  # the retina touches all four sides
    # the old rule centre-crops 200 x 200 of the 300 x 200 photo: the retina (x 22..202) is cut
    # on the left and leaves black on the right
    assert int(plain[size // 2, -1, 0]) < 10 and int(plain[size // 2, 0, 0]) > 60
    np.testing.assert_array_equal(plain, reference(root / "wide.png"))


def test_fundus_crop_off_is_the_old_rule_byte_for_byte(photos, tmp_path):
    root, meta = photos
    packed = pack_images(meta, root, tmp_path / "p", image_size=24, shard_size=8, progress=False)
    for i, path in enumerate(meta["path"]):
        np.testing.assert_array_equal(packed.take([i])[0], old_load_image(root / path, 24))
        np.testing.assert_array_equal(load_image(root / path, 24), old_load_image(root / path, 24))


def test_fundus_crop_of_a_large_jpeg_keeps_the_fov_resolution(photos):
    root, _ = photos
    size = 64
    with Image.open(root / "large.jpg") as img:
        full = np.asarray(img.convert("RGB"))
    got = load_image(root / "large.jpg", size, fundus_crop=True)  # drafted to 400 x 250
    diff = np.abs(got.astype(int) - square_reference(full, size).astype(int))
    assert diff.mean() < 1.5, diff.mean()
    # a FOV under 2 x 64 px at the drafted scale (230 px of 1000 at full size): decoded again
    with Image.open(root / "small_fov.jpg") as img:
        full = np.asarray(img.convert("RGB"))
    got = load_image(root / "small_fov.jpg", size, fundus_crop=True)
    np.testing.assert_array_equal(got, square_reference(full, size))


def test_no_fov_fails_naming_the_file_and_row(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    Image.fromarray(np.zeros((60, 90, 3), np.uint8)).save(root / "black.png")
    meta = pd.DataFrame({"image_id": ["b1"], "path": ["black.png"]})
    crop = {"fundus_crop": True, "progress": False}
    with pytest.raises(
        PackError,
        match=r"black\.png: cannot crop to the retina \(metadata row 0, image_id=b1\)"
        r": no field of view in a 90x60 image: every pixel is darker",
    ):
        pack_images(meta, root, tmp_path / "p", image_size=SIZE, shard_size=4, **crop)
    pack_images(meta, root, tmp_path / "p", image_size=SIZE, shard_size=4, progress=False)  # off
