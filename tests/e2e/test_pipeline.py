"""The whole study on the tiny profile, checked the way a user would check it."""

from __future__ import annotations

import html
import json
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from retfm.registry.models import logged_model_id

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("study")]  # one worker builds it

FMS = {"mae-hospital": "hospital", "mae-screening": "screening"}  # FM -> site
#: the tiny profile's two pre-training runs of each FM: run -> its FM
RUNS = {f"{fm}-r{k}": fm for fm in FMS for k in (0, 1)}


@pytest.fixture(scope="module")
def client(study) -> MlflowClient:
    mlflow.set_tracking_uri(study.tracking_uri)
    mlflow.set_registry_uri(study.tracking_uri)
    return MlflowClient(study.tracking_uri, study.tracking_uri)


def test_registry_holds_both_site_fms_as_runnable_onnx(study, client: MlflowClient) -> None:
    for run, fm in RUNS.items():
        site = FMS[fm]
        version = client.get_model_version_by_alias(f"fm-{run}", "candidate")
        tags = version.tags
        assert (tags["fm"], tags["fm.site"], tags["fm.recipe"]) == (fm, site, "mae")
        assert (tags["fm.run"], tags["fm.replicate"]) == (run, run[-1])
        assert tags["fm.source"] == "pretrained"
        assert float(tags["onnx.parity"]) <= 1e-4
        for key in ("data.md5", "cohort.md5", "git.commit", "params.hash", "recipe.hash"):
            assert tags[key] not in ("", "unknown", "untracked", "unlocked"), key
        model = mlflow.pyfunc.load_model(f"models:/fm-{run}@candidate")
        meta = model.metadata.metadata
        img = int(meta["preprocessing"]["img_size"])
        out = model.predict(np.zeros((3, 3, img, img), dtype=np.float32))
        features = next(iter(out.values())) if isinstance(out, dict) else np.asarray(out)
        assert features.shape[0] == 3 and np.isfinite(features).all()
        about = client.get_registered_model(f"fm-{run}").description
        assert f"Foundation model `{fm}`" in about and f"site `{site}`" in about, about
        assert "`champion` the one promoted by `retfm promote`" in about
    about = client.get_registered_model("clf-hospital_dr-fm-mae-hospital-r0").description
    assert "Classifier for task `hospital_dr`" in about and "`fm-mae-hospital-r0`" in about, about


def test_every_evaluation_run_has_subgroup_keys_and_counts(study, client: MlflowClient) -> None:
    exp = client.get_experiment_by_name("adapt")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'adapt'", max_results=500)
    settings_seeds = 2
    assert len(runs) == len(RUNS) * 3 * settings_seeds
    for r in runs:
        for tag in (
            "study",
            "fm",
            "fm.site",
            "fm.recipe",
            "fm.model",
            "fm.run",
            "fm.replicate",
            "fm.version",
            "task",
            "task.site",
            "aligned",
            "adaptation",
            "seed",
            "data.md5",
            "git.commit",
        ):
            assert tag in r.data.tags, (tag, r.info.run_name)
        keys = r.data.metrics
        assert "auroc" in keys
        assert any(k.startswith("auroc/age/") for k in keys), sorted(keys)
        assert any(k.startswith("n/sex/") for k in keys), sorted(keys)
        assert r.data.tags.get("mlflow.parentRunId")


def test_each_registered_model_carries_its_evaluation(study, client) -> None:  # noqa: ANN001
    """After compare: MLflow 3's model metrics on the logged model behind every FM and
    classifier version, and its model card's Evaluation section filled in."""
    names = [f"fm-{run}" for run in RUNS] + [
        f"clf-{task}-fm-{run}"
        for run in RUNS
        for task in ("hospital_dr", "screening_dr", "public_dr")
    ]
    for name in names:
        version = client.get_model_version_by_alias(name, "candidate")
        model = client.get_logged_model(logged_model_id(version))
        linked = {m.key: m.value for m in model.metrics or []}
        assert linked["auroc"] == pytest.approx(float(version.tags["eval/auroc"]), abs=1e-5)
        assert any(k.startswith("gap/auroc/") for k in linked), (name, sorted(linked))
        assert any(k.startswith("auroc/") for k in linked), (name, sorted(linked))
        card = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model.artifact_location}/extra_files/evaluation.md"
        )
        assert "auroc" in open(card).read().lower(), name  # noqa: PTH123, SIM115


def test_compare_writes_report_and_summary(study, sh) -> None:
    summary = json.loads((study.path / "outputs/study/summary.json").read_text())
    assert summary["tasks"], summary
    report = html.unescape((study.path / "outputs/study/report.html").read_text())
    assert "Methods: how each question is decided" in report
    assert "Measured at this study's design" in report  # calibration at its own test sets
    # and what the test does not cover: one pre-training run per site
    assert "What the per-run test does not cover: a per-run comparison" in report
    assert "Whose data is better on each task (data level)" in report
    assert "Power by replicates" in report
    shown = sh(["retfm", "summary"], study.path).stdout
    assert "hospital_dr" in shown and "mlflow ui" in shown
    # each answer names the test that decided it, never another test's p beside its verdict
    assert "Decided by: data-level test over pre-training runs" in shown
    assert "Decided by: paired test on the same test images" in shown
    assert "Decided by: stratified score test" in shown
    assert "Per pre-training run (which run is better" in shown
    allowed = {"no evidence", "mae-hospital better", "mae-screening better"}
    assert summary["n_replicates"] == 2 and summary["replicates"] == {
        fm: [f"{fm}-r0", f"{fm}-r1"] for fm in FMS
    }
    for task in summary["tasks"]:
        (comparison,) = task["comparisons"]  # data level: one per FM pair, runs pooled
        assert comparison["verdict"] in allowed, comparison  # two runs per site: decidable
        assert len(comparison["replicate_aurocs_a"]) == 2 and comparison["sd_replicates_a"]
        runs = {(c["fm_a"], c["fm_b"]) for c in task["run_comparisons"]}
        assert runs == {("mae-hospital-r0", "mae-screening-r0"),
                        ("mae-hospital-r1", "mae-screening-r1")}  # fmt: skip
        for c in task["run_comparisons"]:
            assert c["verdict"] in {"no evidence", *(f"{r} better" for r in RUNS)} or c[
                "verdict"
            ].startswith("undetermined ("), c
    assert {r["task"] for r in summary["power_by_replicates"]} == {
        t["task"] for t in summary["tasks"]
    }
    table = pd.read_parquet(study.path / "outputs/evaluation/runs.parquet")
    assert set(table["fm"]) == set(FMS) and set(table["run"]) == set(RUNS)


def test_no_patient_id_in_clear_downstream_of_validation(study) -> None:
    """Every table a team pushes (DVC outs) or logs (MLflow artifacts) carries pseudonyms."""
    ids = {
        str(p)
        for csv in (study.path / "data").glob("*/*/metadata.csv")
        for p in pd.read_csv(csv, usecols=["patient_id"])["patient_id"]
    }
    assert len(ids) > 100
    seen = 0
    for root in (study.path / "outputs", study.path / "mlruns" / "artifacts"):
        for path in root.rglob("*"):
            if path.suffix in (".parquet", ".csv") and path.is_file():
                table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
                if "patient_id" in table.columns:
                    seen += 1
                    assert table["patient_id"].astype(str).str.fullmatch(r"pt-[0-9a-f]{16}").all()
                strings = table.select_dtypes(exclude="number")
                cells = {str(v) for c in strings.columns for v in strings[c]}
                assert not ids & cells, (path, sorted(ids & cells)[:3])
            elif path.suffix in (".json", ".md", ".html", ".txt", ".yaml") and path.is_file():
                text = path.read_text(errors="replace")
                assert not [p for p in list(ids)[:400] if p in text], path
    assert seen >= 8  # validated, cohort, packed, prediction tables at least
    record = json.loads((study.path / "outputs/validation/pseudonyms.json").read_text())
    assert record["key"] == "synthetic" and len(record["key_id"]) == 12


def test_second_repro_finds_nothing_to_do(study, sh) -> None:
    start = time.perf_counter()
    proc = sh(["dvc", "repro"], study.path)
    assert "Running stage" not in proc.stdout, proc.stdout
    assert time.perf_counter() - start < 120
    status = sh(["dvc", "status"], study.path).stdout
    assert "changed" not in status, status


def test_rerun_creates_no_new_registry_versions(study, sh, client: MlflowClient) -> None:
    before = {r: len(client.search_model_versions(f"name = 'fm-{r}'")) for r in RUNS}
    sh(["dvc", "repro", "--force", "--single-item", "register@mae-hospital-r0"], study.path)
    after = {r: len(client.search_model_versions(f"name = 'fm-{r}'")) for r in RUNS}
    assert before == after
