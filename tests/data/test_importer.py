from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retfm.data.importer import ImportLayoutError, ImportReport, import_folder_layout


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def public_set(tmp_path: Path) -> Path:
    src = tmp_path / "aptos"
    for split, cls, name in [
        ("train", "0", "img1.png"),
        ("train", "1", "img2.png"),
        ("valid", "0", "img3.png"),
        ("test", "1", "img4.png"),
    ]:
        _png(src / split / cls / name)
    (src / "train" / "0" / ".DS_Store").write_bytes(b"junk")
    (src / "train" / "0" / "notes.txt").write_text("not an image")
    return src


def test_folder_layout_becomes_a_task_folder(public_set, tmp_path):
    dst = tmp_path / "tasks" / "aptos"
    df = import_folder_layout(public_set, dst, source_site="public")
    assert df["image_id"].tolist() == ["img1", "img2", "img3", "img4"]
    assert df["split"].tolist() == ["train", "train", "val", "test"]
    assert df["label"].tolist() == ["0", "1", "0", "1"]
    assert df["patient_id"].tolist() == df["image_id"].tolist()
    assert set(df["source_site"]) == {"public"}
    for rel in df["path"]:
        assert (dst / rel).is_file() and not (dst / rel).is_symlink()
    assert (
        (dst / "metadata.csv")
        .read_text()
        .startswith("image_id,patient_id,path,label,split,source_site")
    )


def test_per_image_metadata_is_joined_and_normalised(public_set, tmp_path, caplog):
    meta = tmp_path / "meta.csv"
    meta.write_text(
        "filename;patient_id;Age;Sex;eye\n"
        "img1.png;P7;65y;female;OD\n"
        "img2.png;P7;70;M;left\n"
        "img3.png;;;;\n"
        "ghost.png;;50;F;L\n"
    )
    dst = tmp_path / "out"
    df = import_folder_layout(public_set, dst, source_site="public", metadata_csv=meta, copy=False)
    by_id = df.set_index("image_id")
    assert by_id.loc["img1", "age"] == 65.0 and by_id.loc["img1", "sex"] == "F"
    assert by_id.loc["img1", "eye"] == "R" and by_id.loc["img2", "eye"] == "L"
    assert by_id.loc["img1", "patient_id"] == "P7" and by_id.loc["img3", "patient_id"] == "img3"
    assert np.isnan(by_id.loc["img4", "age"])
    assert df.attrs["unmatched_metadata_rows"] == [5]
    assert "match no image" in caplog.text
    # hard links: no copy, and (unlike a symlink) nothing that leads out of the task folder
    for rel, image in zip(
        df["path"], ["train/0/img1", "train/1/img2", "valid/0/img3"], strict=False
    ):
        assert not (dst / rel).is_symlink() and (dst / rel).samefile(public_set / f"{image}.png")


def test_bad_metadata_is_refused_with_its_line(public_set, tmp_path):
    meta = tmp_path / "meta.csv"
    meta.write_text("image_id,age\nimg1,old\n")
    with pytest.raises(ValueError, match=r"line 2, column 'age': got 'old'"):
        import_folder_layout(public_set, tmp_path / "out", source_site="public", metadata_csv=meta)


def test_layout_errors(tmp_path, public_set):
    _png(tmp_path / "odd" / "holdout" / "0" / "a.png")
    with pytest.raises(ImportLayoutError, match="holdout.*not a split"):
        import_folder_layout(tmp_path / "odd", tmp_path / "o1", source_site="x")
    _png(public_set / "test" / "0" / "img1.png")
    with pytest.raises(ImportLayoutError, match="img1"):
        import_folder_layout(public_set, tmp_path / "o2", source_site="x")
    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "metadata.csv").write_text("x")
    with pytest.raises(FileExistsError):
        import_folder_layout(public_set, tmp_path / "o3", source_site="x")


def test_the_import_reports_what_it_skipped_or_could_not_use(public_set, tmp_path):
    (public_set / "train" / "1" / "bad.png").write_bytes(b"not a png at all")
    (public_set / "train" / "1" / "named.jpg").write_bytes(
        (public_set / "train/1/img2.png").read_bytes()
    )
    (public_set / "train" / "2").mkdir()  # an empty class folder
    (public_set / "train" / "labels.csv").write_text("x")  # not in a class folder
    _png(public_set / "test" / "3" / "img9.png")  # a class neither train nor val has
    df = import_folder_layout(public_set, tmp_path / "out", source_site="public")
    report = df.attrs["import_report"]
    assert isinstance(report, ImportReport) and report.errors == []
    assert report.images == {"train": {"0": 1, "1": 1}, "val": {"0": 1}, "test": {"1": 1, "3": 1}}
    assert report.skipped == {
        "train/0/notes.txt": "not an image (suffix .txt)",
        "train/1/bad.png": "does not decode as an image (cannot identify image file 'bad.png')",
        "train/1/named.jpg": "PNG bytes named as JPEG",
        "train/labels.csv": "not in a <split>/<class>/ folder",
    }
    text = report.text()
    assert "imported 5 image(s) of 3 class(es) from" in text
    assert "warning: empty class folder(s), nothing imported from them: train/2" in text
    assert (
        "warning: class '3' has 0 images in 'train' but 1 in 'test': the classifier cannot "
        "learn it, so validation will refuse the task" in text
    )
    assert "warning: class '1' has no images in 'val'" in text
    assert (
        "warning: split 'val' holds one class only ('0'): the epoch is picked by validation "
        "AUROC, which needs at least 2 classes, so validation will refuse the task" in text
    )
    assert "warning: 3 file(s) skipped: train/0/notes.txt (not an image (suffix .txt))" in text
    assert "note: 1 hidden file(s) ignored" in text
    assert len(df) == 5 and "bad" not in set(df["image_id"])


def test_a_missing_val_split_is_a_warning_saying_what_it_means(tmp_path):
    for split, cls in [("train", "a"), ("train", "b"), ("test", "a"), ("test", "b")]:
        _png(tmp_path / "set" / split / cls / f"{split}{cls}.png")
    df = import_folder_layout(tmp_path / "set", tmp_path / "out", source_site="x")
    text = df.attrs["import_report"].text()
    assert (
        "warning: no 'val' split folder: adaptation picks the epoch by validation AUROC, so "
        "validation will refuse this task until some patients get split 'val' in "
        f"{tmp_path / 'out' / 'metadata.csv'}" in text
    )


def test_no_images_or_no_train_split_are_errors(tmp_path):
    (tmp_path / "empty" / "train" / "0").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "0" / "notes.txt").write_text("x")
    with pytest.raises(ImportLayoutError) as info:
        import_folder_layout(tmp_path / "empty", tmp_path / "o1", source_site="x")
    assert "error: no images found" in str(info.value)
    assert "train/0/notes.txt (not an image (suffix .txt))" in str(info.value)
    assert info.value.report is not None and info.value.report.errors
    assert not (tmp_path / "o1" / "metadata.csv").exists()
    for split in ("val", "test"):
        _png(tmp_path / "notrain" / split / "0" / f"{split}.png")
    with pytest.raises(ImportLayoutError, match="error: no 'train' split folder"):
        import_folder_layout(tmp_path / "notrain", tmp_path / "o2", source_site="x")
