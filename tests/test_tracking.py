"""Tracking set-up, lineage helpers, and the sender that survives a tracking-server outage."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from retfm import tracking


def test_dvc_and_lock_hashes(tmp_path: Path) -> None:
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc123.dir\n  path: data\n")
    assert tracking.dvc_hash(tmp_path / "data.dvc") == "abc123.dir"
    assert tracking.dvc_hash(tmp_path / "missing.dvc") == "untracked"
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  cohort@a:\n    cmd: x\n    outs:\n"
        "    - path: outputs/cohorts/a\n      md5: fff.dir\n"
    )
    assert tracking.lock_hash("cohort@a", "outputs/cohorts/a", lock) == "fff.dir"
    assert tracking.lock_hash("cohort@b", "outputs/cohorts/b", lock) == "unlocked"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.services
def test_metrics_survive_a_server_outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Metrics logged while the server is down are delivered once it is up; logging never
    blocks the caller."""
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = (
        MlflowClient(db)
        .create_run(MlflowClient(db).create_experiment("pretrain", (tmp_path / "art").as_uri()))
        .info.run_id
    )
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    sender = tracking.BufferedMetricLogger(MlflowClient(uri), run_id, retry_s=0.5)
    start = time.perf_counter()
    for step in range(50):
        sender.log({"loss": 1.0 / (step + 1), "lr": 0.1}, step)
    assert time.perf_counter() - start < 1.0  # the training loop did not wait
    time.sleep(1.5)  # a few failed deliveries while nothing listens
    assert sender.sent == 0

    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            db,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )
    try:
        undelivered = sender.close(timeout_s=90)
        assert undelivered == 0
        history = MlflowClient(db).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(50))
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


def test_experiment_artifacts_live_under_the_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retfm.settings import load_settings

    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[1]
    settings = load_settings(root / "params.yaml")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    exp_id = tracking.experiment_id(settings, "adapt")
    exp = MlflowClient(mlflow.get_tracking_uri()).get_experiment(exp_id)
    assert exp.artifact_location.startswith((tmp_path / "mlruns").as_uri())
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert tracking.experiment_id(settings, "adapt") == exp_id  # idempotent


def test_a_moved_store_is_refused_and_relocate_points_it_at_the_new_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retfm.settings import TrackingSettings

    class Settings:  # what tracking reads of the settings
        tracking = TrackingSettings()
        study = type("S", (), {"name": "t", "seed": 0})()
        profile = "test"

        def digest(self, *_: str) -> str:
            return "d"

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.chdir(first)
    tracking.configure(Settings())  # type: ignore[arg-type]
    with tracking.run(Settings(), "study", name="r", tags={}) as active:  # type: ignore[arg-type]
        mlflow.log_text("report", "report.txt")
        run_id = active.info.run_id
    moved = tmp_path / "moved"
    first.rename(moved)
    monkeypatch.chdir(moved)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # mlflow.set_tracking_uri exports it (a new shell)
    with pytest.raises(tracking.StoreMovedError, match="no longer exists.*retfm relocate"):
        tracking.configure(Settings())  # type: ignore[arg-type]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old, new, rows = tracking.relocate_store(Settings())  # type: ignore[arg-type]
    assert (old, new) == (first / "mlruns/artifacts", moved / "mlruns/artifacts") and rows >= 2
    client = tracking.configure(Settings())  # type: ignore[arg-type]
    path = client.download_artifacts(run_id, "report.txt", str(tmp_path))
    assert Path(path).read_text() == "report"
    assert (moved / "mlruns/mlflow.db.bak").is_file()


def test_a_run_opened_at_the_end_shows_the_stage_duration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compare opens its run when its work is done: ``started`` back-dates it (issue 13)."""
    import time

    from retfm.settings import load_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = load_settings(Path(__file__).resolve().parents[1] / "params.yaml")
    client = tracking.configure(settings)
    started = time.time() - 42.0
    with tracking.run(
        settings, "study", name="compare-x", tags={"stage": "compare"}, started=started
    ) as a:
        mlflow.log_metric("m", 1.0)
    info = client.get_run(a.info.run_id).info
    assert info.run_name == "compare-x" and info.status == "FINISHED"
    assert 42_000 <= info.end_time - info.start_time < 60_000
    assert client.get_run(a.info.run_id).data.tags["stage"] == "compare"
