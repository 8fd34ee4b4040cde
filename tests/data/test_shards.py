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

from retfm.data.images import ImageSource
from retfm.data.shards import PackedSet, PackedSetError, PackError, pack_images

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
