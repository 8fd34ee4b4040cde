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
        with pytest.raises(MetadataError, match="do not have the header's 5 fields"):
            read_metadata(_csv(tmp_path, header + rows, f"wide{i}.csv"), "site")


def test_annotations_match_on_filename(tmp_path):
    path = _csv(tmp_path, "Filename;Age;Sex\nx1.jpg;70y;woman\nx2.jpg;;\n")
    df = read_annotations(path)
    assert df["filename"].tolist() == ["x1.jpg", "x2.jpg"]
    assert df["age"].tolist()[0] == 70.0 and df["sex"].tolist()[0] == "F"


# --- the column structure must be certain: every line one field per header column -------------

SITE = "image_id,patient_id,path,age,sex,camera\n"


def _refused(path: Path, kind: str = "site") -> MetadataError:
    with pytest.raises(MetadataError) as info:
        read_metadata(path, kind)  # type: ignore[arg-type]
    return info.value


def test_a_row_with_fewer_fields_than_the_header_is_refused_not_padded(tmp_path):
    # pandas pads a short row with empty cells: line 3 lost its camera silently, and line 4
    # (age missing) had its sex read as age and its camera as sex
    path = _csv(
        tmp_path,
        SITE + "a,p,images/a.png,60,F,topcon\nb,q,images/b.png,61,M\nc,r,images/c.png,F,topcon\n",
    )
    err = _refused(path)
    assert [(p.row, p.column) for p in err.problems] == [(3, "camera"), (4, "camera")]
    message = str(err)
    assert "do not have the header's 6 fields" in message
    assert f"{path} line 3, column 'camera': got 'b,q,images/b.png,61,M', expected 6" in message
    assert "this line has 5" in message
    assert "values may sit in the wrong columns" in message


def test_rows_with_more_fields_are_refused_alike_first_or_later(tmp_path):
    # pandas: a long first row was a warning without a line, a long later row a tokenizer error
    # naming one line only; both are now listed with their extra values
    path = _csv(
        tmp_path,
        SITE + "a,p,images/a.png,60,F,topcon,x\n"
        "b,q,images/b.png,61,M,topcon\n"
        "c,r,images/c.png,62,F,topcon,,\n",
    )
    err = _refused(path)
    assert [(p.row, p.value) for p in err.problems] == [
        (2, "a,p,images/a.png,60,F,topcon,x"),
        (4, "c,r,images/c.png,62,F,topcon,,"),
    ]
    assert all(p.column == "(field 7; the header has 6)" for p in err.problems)
    assert f"{path} line 2, column '(field 7; the header has 6)'" in str(err)
    assert "this line has 7" in str(err)


def test_a_header_with_both_separators_is_refused_as_uncertain(tmp_path):
    for i, header in enumerate(
        ["image_id;patient_id,path;age;sex", "image_id;patient_id;path;age;sex;notes,extra"]
    ):
        path = _csv(tmp_path, header + "\na;p;images/a.png;60;F;x\n", f"mixed{i}.csv")
        err = _refused(path)
        message = str(err)
        assert f"{path} line 1 (header)" in message and "separator is not certain" in message
        assert "',' 1 time(s)" in message and "sep=;" in message
        assert [p.row for p in err.problems] == [1]
    assert err.problems[0].column == "notes,extra"


def test_excel_sep_line_declares_the_separator(tmp_path):
    path = _csv(
        tmp_path,
        "sep=;\nimage_id;patient_id;path;age;sex;weight, kg\n"
        "a;p;images/a.png;60;F;70,5\n"
        "b;q;images/b.png;x;M;80\n",
    )
    err = _refused(path)
    assert f"{path} line 4, column 'age': got 'x'" in str(err)  # lines count the sep= line
    path.write_text(path.read_text().replace(";x;", ";61;"))
    df = read_metadata(path, "site")
    assert df["row"].tolist() == [3, 4]
    assert df["weight, kg"].tolist() == ["70,5", "80"]
    bad = _csv(tmp_path, "sep=|\nimage_id|patient_id\n", "pipe.csv")
    assert "line 1 declares the separator '|'" in str(_refused(bad))


def test_empty_trailing_columns_are_dropped_with_a_note(tmp_path):
    # Excel's "a;b;c;;;" on every line (and a trailing separator on the header alone)
    path = _csv(
        tmp_path,
        "image_id;patient_id;path;age;sex;;;\na;p;images/a.png;60;F;;;\nb;q;images/b.png;61;M\n",
    )
    df = read_metadata(path, "site")
    assert list(df.columns) == ["row", "image_id", "patient_id", "path", "age", "sex"]
    assert df.attrs["empty_columns_dropped"] == 3


def test_an_unnamed_column_holding_data_is_refused(tmp_path):
    path = _csv(
        tmp_path,
        "image_id,patient_id,path,age,sex,\na,p,images/a.png,60,F,\nb,q,images/b.png,61,M,zzz\n",
    )
    err = _refused(path)
    assert [(p.row, p.column, p.value) for p in err.problems] == [(3, "(unnamed column 6)", "zzz")]
    assert "the header (line 1) has no name for this column" in str(err)
    middle = _csv(tmp_path, "image_id,,patient_id,path,age,sex\na,,p,x.png,60,F\n", "mid.csv")
    err = _refused(middle)
    assert [(p.row, p.column) for p in err.problems] == [(1, "(unnamed column 2)")]
    assert f"{middle} line 1, column '(unnamed column 2)'" in str(err)


def test_a_repeated_header_name_is_refused_naming_its_columns(tmp_path):
    # pandas renamed the second 'age' to 'age.1', so an exact repeat passed unnoticed
    for i, header in enumerate(
        ["image_id,patient_id,path,age,sex,age", "image_id,patient_id,path,age,sex,Age "]
    ):
        path = _csv(tmp_path, header + "\na,p,images/a.png,60,F,61\n", f"dupe{i}.csv")
        err = _refused(path)
        assert [(p.row, p.column, p.value) for p in err.problems] == [(1, "age", "columns 4 and 6")]
        assert f"{path} line 1, column 'age'" in str(err)


def test_a_quote_left_open_is_refused_at_its_line(tmp_path):
    header = "image_id,patient_id,path,age,sex\n"
    to_end = _csv(
        tmp_path, header + 'a,p,images/a.png,60,F\nb,q,"images/b.png,61,M\nc,r,x.png,62,F\n'
    )
    err = _refused(to_end)
    assert [(p.row, p.column) for p in err.problems] == [(3, "path")]
    assert "never closed" in str(err) and f"{to_end} line 3, column 'path'" in str(err)
    # closed again further down: one value swallows lines 3-4; later lines keep their numbers
    closed = _csv(
        tmp_path,
        header + 'a,p,images/a.png,60,F\nb,q,"images/b.png,61\nM",61,F\nc,r,x.png,62,F\n'
        "d,s,y.png,abc,F\n",
        "closed.csv",
    )
    err = _refused(closed)
    assert [(p.row, p.column) for p in err.problems] == [(3, "path"), (6, "age")]
    assert "runs over lines 3-4" in str(err)


def test_tab_separated_files_are_read(tmp_path):
    path = _csv(tmp_path, "image_id\tpatient_id\tpath\tage\tsex\na\tp\timages/a.png\t60\tF\n")
    assert read_metadata(path, "site")["path"].tolist() == ["images/a.png"]
    mixed = _csv(tmp_path, "image_id\tpatient_id\tpath,age\tsex\n", "mixed.csv")
    assert "separator is not certain" in str(_refused(mixed))


def test_a_table_without_data_rows_is_refused(tmp_path):
    for i, rest in enumerate(["", "\n\n;;;;\n"]):
        path = _csv(tmp_path, "image_id;patient_id;path;age;sex\n" + rest, f"e{i}.csv")
        message = str(_refused(path))
        assert f"{path}: no data rows" in message and "site table needs at least one row" in message


def test_quoted_values_keep_their_separators(tmp_path):
    path = _csv(tmp_path, SITE + 'a,p,"images/a,1.png",60,F,"topcon, ""trc"""\n')
    df = read_metadata(path, "site")
    assert df["path"].tolist() == ["images/a,1.png"]
    assert df["camera"].tolist() == ['topcon, "trc"']
