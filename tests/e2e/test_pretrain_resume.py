"""A pre-training stage killed with SIGKILL resumes when the stage is rerun, into the same
MLflow run, and ends at the step count of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.e2e


def test_killed_pretrain_stage_resumes_into_the_same_run(tmp_path, clone, sh, tiny_data) -> None:  # noqa: ANN001
    repo = clone(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"].update(epochs=12, checkpoint_every_steps=3)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(tiny_data, repo / "data")
    sh(["dvc", "add", "-q", "data"], repo)
    sh(["dvc", "repro", "pack_cohort@hospital-r0"], repo)

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.pretrain", "mae-hospital-r0"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpts = repo / "outputs" / "checkpoints" / "pretrain" / "mae-hospital-r0"
    deadline = time.monotonic() + 300
    while not list(ckpts.glob("*/checkpoint.pt")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint written in time"
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not (repo / "outputs" / "pretrain" / "mae-hospital-r0" / "run.json").exists()

    sh(["dvc", "repro", "pretrain@mae-hospital-r0"], repo)
    run = json.loads((repo / "outputs" / "pretrain" / "mae-hospital-r0" / "run.json").read_text())
    n_images = int(params["cohort"]["images_per_site"])
    steps_per_epoch = n_images // int(params["pretrain"]["batch_size"])
    assert run["steps"] == 12 * steps_per_epoch

    uri = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name("pretrain")
    runs = client.search_runs([exp.experiment_id], "tags.`fm.run` = 'mae-hospital-r0'")
    assert len(runs) == 1  # one run, resumed, not a new one
    assert runs[0].data.tags["retfm.key"] == run["mlflow_key"]  # found by its key, not its id
    run_id = runs[0].info.run_id
    history = client.get_metric_history(run_id, "loss")
    assert history and max(m.step for m in history) >= run["steps"] - 10
    assert client.get_metric_history(run_id, "final_loss")
