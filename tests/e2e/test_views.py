"""What a researcher opens, opened in a headless browser (Debian's chromium): ``mlflow ui`` on
the four-FM study's store (experiments in the model-training view, the study's runs, a
registered FM with its evaluation, the registry list) and the study report. Each page must
render the content a researcher goes there for; screenshots are kept beside the study
(``views/*.png``) for a person to look at."""

from __future__ import annotations

import html
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.e2e, pytest.mark.services, pytest.mark.xdist_group("four")]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _browser(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's package)")
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=25000", *args],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def render(url: str, shot: Path, profile: Path) -> str:
    """The page's DOM after its scripts ran; a screenshot of it at ``shot``."""
    _browser(["--window-size=1500,1000", f"--screenshot={shot}", url], profile)
    dom = _browser(["--dump-dom", url], profile).stdout
    assert dom.strip(), f"{url}: the browser returned no page"
    return html.unescape(dom)


@pytest.fixture(scope="module")
def ui(four, tmp_path_factory):  # noqa: ANN001, ANN201
    from retfm.team import mlflow_server

    with mlflow_server(
        tmp_path_factory.mktemp("ui"),
        backend_store_uri=four.tracking_uri,
        artifacts_destination=(four.path / "mlruns" / "artifacts").as_uri(),
    ) as server:
        yield server.uri


@pytest.fixture(scope="module")
def shots(four) -> Path:  # noqa: ANN001
    folder = four.path / "views"
    folder.mkdir(exist_ok=True)
    return folder


def test_experiments_open_in_the_model_training_view(ui, shots, tmp_path) -> None:  # noqa: ANN001
    dom = render(f"{ui}/#/experiments?workflowType=machine_learning",
                 shots / "experiments.png", tmp_path)  # fmt: skip
    for name in ("adapt", "pretrain", "study", "data"):
        assert f">{name}<" in dom, name
    assert "Model training" in dom
    assert (shots / "experiments.png").stat().st_size > 10_000


def test_the_study_run_and_its_figures_are_there(ui, four, shots, tmp_path) -> None:  # noqa: ANN001
    client = MlflowClient(four.tracking_uri, four.tracking_uri)
    exp = client.get_experiment_by_name("study")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    dom = render(f"{ui}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning",
                 shots / "study.png", tmp_path)  # fmt: skip
    assert "compare-retfm-recovery" in dom
    run = client.search_runs([exp.experiment_id], "tags.stage = 'compare'")[0]
    images = {f.path for f in client.list_artifacts(run.info.run_id, "images")}
    assert any("subgroups_hospital_dr" in p for p in images), images


def test_a_registered_fm_shows_its_identity_and_evaluation(ui, shots, tmp_path) -> None:  # noqa: ANN001
    dom = render(f"{ui}/#/models/fm-dinov2-hospital/versions/1", shots / "fm.png", tmp_path)
    assert "candidate" in dom and "Evaluation" in dom
    assert "imported from RETFound_dinov2_meh.pth" in dom
    for tag in ("fm.recipe", "eval/auroc", "eval.undefined_groups.ethnicity"):
        assert tag in dom, tag
    listing = render(f"{ui}/#/models", shots / "models.png", tmp_path)
    for fm in ("mae-hospital", "mae-screening", "dinov2-hospital", "dinov2-screening"):
        assert f"fm-{fm}" in listing and f"clf-hospital_dr-fm-{fm}" in listing


def test_the_report_renders_offline_with_its_figures(four, shots, tmp_path) -> None:  # noqa: ANN001
    report = four.path / "outputs" / "study" / "report.html"
    dom = render(report.as_uri(), shots / "report.png", tmp_path)
    assert "Methods: how each question is decided" in dom
    assert dom.count('src="data:image/png;base64,') >= 4  # every figure embedded
    assert "http://" not in report.read_text() and "https://" not in report.read_text()
    for fm in ("mae-hospital", "dinov2-screening"):
        assert fm in dom
