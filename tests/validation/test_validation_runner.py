import json
import os
import re

import pandas as pd
import pytest

from retfm.data.importer import import_folder_layout
from retfm.validation.offline import remote_assets
from retfm.validation.report import ValidationFailed
from retfm.validation.runner import validate_cohort, validate_raw


def test_valid_data_passes_and_writes_tables_report_and_docs(make_data, tmp_path, settings, png):
    data = make_data()
    png(data / "sites" / "hospital" / "images" / "hospital0.png", mode="L")  # grayscale is fine
    out = tmp_path / "out"
    report = validate_raw(settings, data, out)
    assert report.success, report.summary_text()
    assert [s.name for s in report.suites] == [
        "site.hospital",
        "site.screening",
        "task.hospital_dr",
    ]
    site = pd.read_parquet(out / "sites" / "hospital.parquet")
    assert len(site) == 8 and "row" in site.columns and "image_problem" not in site.columns
    assert str(tmp_path).encode() not in (out / "sites" / "hospital.parquet").read_bytes()
    task = pd.read_parquet(out / "tasks" / "hospital_dr.parquet")
    assert set(task["split"]) == {"train", "val", "test"}
    assert json.loads((out / "report.json").read_text())["success"] is True
    index = (out / "data_docs" / "index.html").read_text()
    assert "site.hospital" in index
    assert any("converted_to_rgb" in note for note in report.suites[0].notes)
    # every Data Docs page opens offline: nothing loaded from the network, styles bundled
    pages = list((out / "data_docs").rglob("*.html"))
    assert len(pages) >= 4
    for page in pages:
        html = page.read_text()
        assert remote_assets(html) == [], (page, remote_assets(html)[:3])
        assert 'id="retfm-offline"' in html


def test_bad_images_and_rows_fail_naming_file_row_and_field(make_data, tmp_path, settings, png):
    rows = [
        "a0,p0,images/a0.png,60,F,white,L,cam",
        "a1,p1,images/a1.png,61,M,white,R,cam",
        "a1,p9,images/a1b.png,62,F,white,R,cam",  # same image id, different row
        "a3,p3,images/gone.png,63,F,white,R,cam",
        "a4,p4,images/zero.png,64,F,white,R,cam",
        "a5,p5,images/cut.png,65,F,white,R,cam",
        "a6,p6,images/named.jpg,66,F,white,R,cam",
        "a7,p7,images/small.png,67,F,white,R,cam",
    ]
    data = make_data(site_rows={"hospital": rows})
    images = data / "sites" / "hospital" / "images"
    (images / "gone.png").unlink()
    (images / "zero.png").write_bytes(b"")
    whole = png(images / "cut.png", side=64).read_bytes()
    (images / "cut.png").write_bytes(whole[: len(whole) // 2])
    (images / "named.jpg").write_bytes(png(images / "x.png").read_bytes())
    png(images / "small.png", side=16)
    out = tmp_path / "out"
    (out / "sites").mkdir(parents=True)
    (out / "sites" / "hospital.parquet").write_bytes(b"stale")

    with pytest.raises(ValidationFailed) as info:
        validate_raw(settings, data, out)
    text = str(info.value)
    csv = str(data / "sites" / "hospital" / "metadata.csv")
    assert f"[FAIL] site.hospital ({csv}, 8 rows)" in text
    assert "expect_column_values_to_be_unique on 'image_id': 2 row(s)" in text
    assert "row 3 = 'a1' [images/a1.png], row 4 = 'a1' [images/a1b.png]" in text
    assert "expect_column_values_to_be_null on 'image_problem': 5 row(s)" in text
    for row, file, problem in [
        (5, "gone.png", "missing"),
        (6, "zero.png", "empty"),
        (7, "cut.png", "truncated"),
        (8, "named.jpg", "format_mismatch: PNG bytes named as JPEG"),
        (9, "small.png", "too_small: 16x16 px"),
    ]:
        assert f"row {row} = '{problem}" in text and f"[images/{file}]" in text
    assert "[ok  ] site.screening" in text and "[ok  ] task.hospital_dr" in text
    assert not (out / "sites" / "hospital.parquet").exists()
    assert not list(out.glob("*/*.parquet"))
    assert (out / "data_docs" / "index.html").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["success"] is False
    assert saved == json.loads(info.value.report.to_json())


def test_unreadable_csv_is_a_failed_suite_not_a_crash(make_data, tmp_path, settings):
    data = make_data(site_rows={"screening": ["s0,q0,images/s0.png,abc,F,white,L,cam"]})
    task_csv = data / "tasks" / "hospital_dr" / "metadata.csv"
    task_csv.write_text("image_id,patient_id,path,label,source_site\nt0,tp0,images/t0.png,1,x\n")
    with pytest.raises(ValidationFailed) as info:
        validate_raw(settings, data, tmp_path / "out")
    report = info.value.report
    by_name = {s.name: s for s in report.suites}
    assert by_name["site.hospital"].success
    age = by_name["site.screening"].failures[0]
    assert (age.expectation, age.column, age.rows, age.values) == (
        "read_metadata",
        "age",
        [2],
        ["abc"],
    )
    header = next(f for f in by_name["task.hospital_dr"].failures if f.column == "split")
    assert (header.column, header.rows) == ("split", [1])
    assert header.detail == "expected this required column in the header"
    text = report.summary_text()
    assert "read_metadata on 'age': 1 row(s) (expected years as a number" in text
    assert (tmp_path / "out" / "data_docs" / "index.html").is_file()


def test_task_split_leak_is_caught(make_data, tmp_path, settings):
    rows = [
        "t0,tp0,images/t0.png,0,train,hospital,40,F",
        "t1,tp1,images/t1.png,1,train,hospital,41,M",
        "t2,tp0,images/t2.png,0,val,hospital,42,F",
        "t3,tp3,images/t3.png,1,test,hospital,43,M",
        "t4,tp4,images/t4.png,7,test,public,44,M",
    ]
    with pytest.raises(ValidationFailed) as info:
        validate_raw(settings, make_data(task_rows=rows), tmp_path / "out")
    text = str(info.value)
    assert "on 'patient_in_several_splits': 2 row(s)" in text and "row 2 = True" in text
    assert "on 'label': 1 row(s)" in text and "row 6 = '7'" in text


def test_cohort_validation(tmp_path, settings):
    n = 200
    pool = pd.DataFrame(
        {
            "row": range(2, n + 2),
            "image_id": [f"i{i}" for i in range(n)],
            "patient_id": [f"p{i}" for i in range(n)],
            "path": [f"images/i{i}.png" for i in range(n)],
            "age": [20.0 + (i % 70) for i in range(n)],
            "sex": ["F", "M"] * (n // 2),
        }
    )
    cohort = pool.iloc[:140]  # two full cycles of ages, both sexes: the pool's mix
    report = validate_cohort(cohort, pool, {"p199"}, settings, tmp_path / "ok", site="hospital")
    assert report.success
    assert (tmp_path / "ok" / "data_docs" / "index.html").is_file()
    with pytest.raises(ValidationFailed) as info:
        validate_cohort(pool.iloc[:60], pool, {"p3"}, settings, tmp_path / "bad", site="hospital")
    text = str(info.value)
    assert "[FAIL] cohort.hospital" in text and "row 5 = True" in text
    assert "[FAIL] cohort_mix.hospital" in text and "age_band=" in text


def test_imported_public_layout_validates_as_a_task(make_data, tmp_path, settings, png):
    layout = tmp_path / "public_set"
    for i, (split, label) in enumerate(
        [("train", "a"), ("train", "b"), ("val", "a"), ("val", "b"), ("test", "b")]
    ):
        png(layout / split / label / f"img{i}.png", seed=i)
    data = make_data()
    task_dir = data / "tasks" / "hospital_dr"
    for old in [task_dir / "metadata.csv", *task_dir.rglob("*.png")]:
        old.unlink()
    import_folder_layout(layout, task_dir, source_site="public")
    report = validate_raw(settings, data, tmp_path / "out")
    assert report.success, report.summary_text()
    task = pd.read_parquet(tmp_path / "out" / "tasks" / "hospital_dr.parquet")
    assert sorted(task["label"]) == ["a", "a", "b", "b", "b"]


def _task(rows: list[tuple[str, str, str]]) -> list[str]:
    """Task rows from (patient, label, split); image i is t<i>."""
    return [
        f"t{i},{patient},images/t{i}.png,{label},{split},hospital,{40 + i},F"
        for i, (patient, label, split) in enumerate(rows)
    ]


def _failed(settings, data, tmp_path) -> str:  # noqa: ANN001
    with pytest.raises(ValidationFailed) as info:
        validate_raw(settings, data, tmp_path / "out")
    return str(info.value)


def test_a_table_without_rows_fails_naming_site_and_file(make_data, tmp_path, settings):
    data = make_data(site_rows={"screening": []})
    text = _failed(settings, data, tmp_path)
    csv = data / "sites" / "screening" / "metadata.csv"
    assert f"[FAIL] site.screening ({csv}, 0 rows)" in text
    assert f"{csv}: no data rows: the header (line 1) is followed by nothing" in text
    assert "[ok  ] site.hospital" in text


def test_a_ragged_line_fails_validation_naming_line_and_column(make_data, tmp_path, settings):
    data = make_data()
    csv = data / "sites" / "hospital" / "metadata.csv"
    lines = csv.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0]  # line 4 loses its last field (camera)
    csv.write_text("\n".join(lines) + "\n")
    text = _failed(settings, data, tmp_path)
    assert f"{csv}: 1 line(s) do not have the header's 8 fields" in text
    assert "read_metadata on 'camera': 1 row(s) (expected 8 fields" in text
    assert "row 4 = 'hospital2,hospitalp1,images/hospital2.png,40,F,white,L'" in text


def test_a_class_missing_from_train_is_explained(make_data, tmp_path, settings):
    rows = [("p0", "0", "train"), ("p1", "1", "train"), ("p2", "0", "val"), ("p3", "1", "val")]
    rows += [("p4", "0", "test"), ("p5", "2", "test"), ("p6", "2", "test")]
    text = _failed(settings, make_data(task_rows=_task(rows)), tmp_path)
    assert (
        "task hospital_dr: class '2' has 0 images in split 'train' but 2 in 'test'; the "
        "classifier cannot learn it. Move some of its patients into train or drop the class; "
        "e.g. row 7 = '2', row 8 = '2'"
    ) in text


def test_a_single_class_val_split_and_an_empty_split_are_explained(make_data, tmp_path, settings):
    rows = [("p0", "0", "train"), ("p1", "1", "train"), ("p2", "0", "val"), ("p3", "0", "val")]
    text = _failed(settings, make_data(task_rows=_task(rows)), tmp_path)
    assert "task hospital_dr: split 'val' holds one class only ('0', 2 images)" in text
    assert "Move patients of another class into val" in text
    assert "task hospital_dr: split 'test' has no images" in text
    assert "nothing to report the classifier's performance on" in text


def test_a_patient_in_two_splits_is_explained(make_data, tmp_path, settings):
    rows = [("p0", "0", "train"), ("p1", "1", "train"), ("p0", "0", "val"), ("p3", "1", "val")]
    rows += [("p4", "0", "test"), ("p5", "1", "test")]
    text = _failed(settings, make_data(task_rows=_task(rows)), tmp_path)
    assert (
        "task hospital_dr: 1 patient(s) have images in more than one split, e.g. patient 'p0' "
        "in 'train' (line 2) and 'val' (line 4)"
    ) in text


@pytest.mark.parametrize("check_images", [True, False])
def test_a_symlink_out_of_the_folder_is_refused(make_data, tmp_path, settings, png, check_images):
    validation = settings.validation.model_copy(update={"check_images": check_images})
    settings = settings.model_copy(update={"validation": validation})
    data = make_data()
    site = data / "sites" / "hospital"
    outside = png(tmp_path / "elsewhere" / "x.png")
    (site / "images" / "hospital3.png").unlink()
    os.symlink(outside, site / "images" / "hospital3.png")  # a file link, leading out (line 5)
    os.symlink(tmp_path / "elsewhere", site / "linked")  # a folder link on the path (line 7)
    rows = (site / "metadata.csv").read_text().splitlines()
    rows[6] = rows[6].replace("images/hospital5.png", "linked/x.png")
    os.replace(site / "images" / "hospital1.png", site / "images" / "real.png")
    os.symlink("real.png", site / "images" / "hospital1.png")  # stays inside: fine (line 3)
    (site / "metadata.csv").write_text("\n".join(rows) + "\n")
    text = _failed(settings, data, tmp_path)
    assert "expect_column_values_to_be_null on 'image_problem': 2 row(s)" in text
    target = os.path.realpath(outside)
    assert f"row 5 = 'outside_folder: a symbolic link leads to {target}, outside {site}'" in text
    assert "[images/hospital3.png]" in text and "[linked/x.png]" in text
    assert "row 3 " not in text


def test_validated_tables_carry_pseudonyms_not_the_hospitals_ids(make_data, tmp_path, settings):
    data = make_data()
    out = tmp_path / "out"
    validate_raw(settings, data, out)
    raw = {
        name: pd.read_csv(data / kind / name / "metadata.csv")
        for kind, name in [("sites", "hospital"), ("sites", "screening"), ("tasks", "hospital_dr")]
    }
    written = {
        name: pd.read_parquet(out / kind / f"{name}.parquet")
        for kind, name in [("sites", "hospital"), ("sites", "screening"), ("tasks", "hospital_dr")]
    }
    from retfm.data.pseudonyms import load_key, pseudonym

    key = load_key(settings.privacy.pseudonym_key)
    for name, table in written.items():
        assert table["patient_id"].str.fullmatch(r"pt-[0-9a-f]{16}").all()
        expected = [pseudonym(key, p) for p in raw[name]["patient_id"].astype(str)]
        assert table["patient_id"].tolist() == expected  # row order and grouping kept
    ids = {str(p) for t in raw.values() for p in t["patient_id"]}
    for path in out.rglob("*"):  # tables, report, Data Docs
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
            cells = {str(v) for c in table.columns for v in table[c]}
            assert not ids & cells, (path, ids & cells)
        elif path.suffix in (".json", ".html"):
            text = path.read_text()
            leaked = [p for p in ids if re.search(rf"\b{p}\b", text)]
            assert not leaked and key.secret.hex() not in text, (path, leaked)
    record = json.loads((out / "pseudonyms.json").read_text())
    assert record["key_id"] == key.key_id and record["patients"] == len(ids)


def test_a_missing_site_key_stops_validation_before_it_starts(make_data, tmp_path, settings,
                                                              monkeypatch) -> None:  # fmt: skip
    from retfm.data.pseudonyms import PseudonymError

    monkeypatch.delenv("RETFM_PSEUDONYM_KEY", raising=False)
    env_key = settings.model_copy(
        update={
            "privacy": settings.privacy.model_copy(
                update={"pseudonym_key": "env:RETFM_PSEUDONYM_KEY"}
            )
        }  # fmt: skip
    )
    with pytest.raises(PseudonymError, match="RETFM_PSEUDONYM_KEY is not set"):
        validate_raw(env_key, make_data(), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written
