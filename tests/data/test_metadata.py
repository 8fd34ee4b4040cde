from pathlib import Path

import pytest

from retfm.data.metadata import MetadataError, read_annotations, read_metadata


def _csv(tmp_path: Path, text: str, name: str = "metadata.csv", bom: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def test_hospital_export_quirks_are_normalised(tmp_path):
    path = _csv(
        tmp_path,
        "Image_ID ; patient_id;path;age;sex;ethnicity;eye;camera;notes\n"
        "a1;p1;images/a1.png;65y;female;Caucasian;OS;topcon;x\n"
        "\n"
        "a2;p1;.\\images\\a2.png;65.0;2;;right;topcon;\n"
        "a2;p1;.\\images\\a2.png;65.0;2;;right;topcon;\n"
        " a3 ;p2;images/a3.png;70 yrs;M;Chinese;;;\n"
        ";;;;;;;;\n"
        "a4;p3;images/a4.png;81;1;south-asian;L;;\n",
        bom=True,
    )
    df = read_metadata(path, "site")
    assert df["image_id"].tolist() == ["a1", "a2", "a3", "a4"]
    assert df["row"].tolist() == [2, 4, 6, 8]
    assert df["age"].tolist() == [65.0, 65.0, 70.0, 81.0]
    assert df["sex"].tolist() == ["F", "F", "M", "M"]
    assert df["ethnicity"].tolist() == ["white", "unknown", "east_asian", "south_asian"]
    assert df["eye"].tolist() == ["L", "R", "unknown", "L"]
    assert df["path"].tolist() == [f"images/a{i}.png" for i in range(1, 5)]
    assert df["notes"].tolist() == ["x", "", "", ""]  # unknown columns are kept
    assert df.attrs["duplicate_rows_dropped"] == 1
    assert df.attrs["blank_lines_dropped"] == 2


def test_task_table_with_optional_columns_missing_values(tmp_path):
    path = _csv(
        tmp_path,
        "image_id,patient_id,path,label,split,source_site,age,sex\n"
        "t1,p1,images/t1.png,dr,Training,public,,\n"
        "t2,p2,images/t2.png,no_dr,validation,public,50,F\n",
    )
    df = read_metadata(path, "task")
    assert df["split"].tolist() == ["train", "val"]
    assert df["age"].isna().tolist() == [True, False]
    assert df["sex"].isna().tolist() == [True, False]


def test_missing_required_column_fails_at_once_naming_it(tmp_path):
    path = _csv(tmp_path, "image_id,path,age,sex\na,images/a.png,60,F\n")
    with pytest.raises(MetadataError) as info:
        read_metadata(path, "site")
    message = str(info.value)
    assert str(path) in message and "line 1" in message and "patient_id" in message
    assert [p.column for p in info.value.problems] == ["patient_id"]


def test_every_invalid_cell_is_listed_with_file_row_column_and_expectation(tmp_path):
    path = _csv(
        tmp_path,
        "image_id,patient_id,path,age,sex,ethnicity,eye\n"
        "a,p,images/a.png,abc,F,white,L\n"
        "b,p,../outside.png,60,F,white,L\n"
        "c,p,/abs/c.png,60,F,martian,L\n"
        "d,,C:\\d.png,60,X,white,up\n",
    )
    with pytest.raises(MetadataError) as info:
        read_metadata(path, "site")
    err = info.value
    cells = {(p.row, p.column, p.value) for p in err.problems}
    assert cells == {
        (2, "age", "abc"),
        (3, "path", "../outside.png"),
        (4, "path", "/abs/c.png"),
        (4, "ethnicity", "martian"),
        (5, "patient_id", ""),
        (5, "path", "C:\\d.png"),
        (5, "sex", "X"),
        (5, "eye", "up"),
    }
    message = str(err)
    assert f"{path} line 2, column 'age': got 'abc', expected years as a number" in message
    assert "path: 3" in message  # count per column
    assert "... and 3 more" in message
    assert err.file == str(path)


def test_empty_age_is_an_error_when_required(tmp_path):
    path = _csv(tmp_path, "image_id,patient_id,path,age,sex\na,p,images/a.png,,F\n")
    with pytest.raises(MetadataError, match="line 2, column 'age'"):
        read_metadata(path, "site")


def test_bad_split_and_empty_label_in_a_task(tmp_path):
    path = _csv(
        tmp_path,
        "image_id,patient_id,path,label,split,source_site\n"
        "a,p,images/a.png,,train,x\nb,q,images/b.png,1,holdout,x\n",
    )
    with pytest.raises(MetadataError) as info:
        read_metadata(path, "task")
    assert {(p.row, p.column) for p in info.value.problems} == {(2, "label"), (3, "split")}


def test_unreadable_files_are_metadata_errors(tmp_path):
    with pytest.raises(MetadataError, match="no such metadata file"):
        read_metadata(tmp_path / "nope.csv", "site")
    with pytest.raises(MetadataError, match="not UTF-8"):
        latin = tmp_path / "latin.csv"
        latin.write_bytes("image_id,patient_id,path,age,sex\na,p,é.png,1,F\n".encode("latin-1"))
        read_metadata(latin, "site")
    with pytest.raises(MetadataError, match="empty file"):
        read_metadata(_csv(tmp_path, "", name="empty.csv"), "site")
    header = "image_id,patient_id,path,age,sex\n"
    for i, rows in enumerate(["a,p,x.png,1,F,extra\n", "a,p,x.png,1,F\nb,p,y.png,1,F,extra\n"]):
        with pytest.raises(MetadataError, match="not a readable CSV"):
            read_metadata(_csv(tmp_path, header + rows, f"wide{i}.csv"), "site")


def test_annotations_match_on_filename(tmp_path):
    path = _csv(tmp_path, "Filename;Age;Sex\nx1.jpg;70y;woman\nx2.jpg;;\n")
    df = read_annotations(path)
    assert df["filename"].tolist() == ["x1.jpg", "x2.jpg"]
    assert df["age"].tolist()[0] == 70.0 and df["sex"].tolist()[0] == "F"
