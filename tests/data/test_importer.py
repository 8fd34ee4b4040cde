from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retfm.data.importer import ImportLayoutError, import_folder_layout


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
    assert all((dst / rel).is_symlink() for rel in df["path"])


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
