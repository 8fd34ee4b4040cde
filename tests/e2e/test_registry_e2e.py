"""The registry of a reproduced tiny study, used as a user would: serve a registered classifier
over HTTP, batch-predict the study's own images, and promote with the study's evaluation."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from retfm.data.shards import load_image
from retfm.models.encoder import Preprocessing

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("study")]  # one worker builds it

FM, TASK = "mae-hospital-r0", "hospital_dr"  # replicate r0 of the hospital FM
CLASSIFIER = f"clf-{TASK}-fm-{FM}"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(study) -> dict[str, str]:  # noqa: ANN001
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": study.tracking_uri,
    }


def _task_images(study, n: int) -> tuple[pd.DataFrame, Preprocessing]:  # noqa: ANN001
    meta = pd.read_csv(study.path / "data" / "tasks" / TASK / "metadata.csv")
    mlflow.set_tracking_uri(study.tracking_uri)
    mlflow.set_registry_uri(study.tracking_uri)
    info = mlflow.models.get_model_info(f"models:/{CLASSIFIER}@candidate")
    prep = Preprocessing.from_json(json.dumps(info.metadata["preprocessing"]))
    return meta[meta["split"] == "test"].head(n), prep


def test_mlflow_serves_the_registered_classifier_over_http(study) -> None:  # noqa: ANN001
    rows, prep = _task_images(study, 4)
    folder = study.path / "data" / "tasks" / TASK
    images = prep.center_crop(np.stack([  # the model's own view: fundus crop, resize, centre
        load_image(folder / p, prep.view_size, fundus_crop=prep.fundus_crop) for p in rows["path"]
    ]))  # fmt: skip
    x = (images.astype(np.float32) / 255.0 - np.asarray(prep.mean, np.float32)) / np.asarray(
        prep.std, np.float32
    )
    body = json.dumps({"inputs": x.transpose(0, 3, 1, 2).tolist()}).encode()
    port = _free_port()
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", f"models:/{CLASSIFIER}@candidate",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=study.path, env=_env(study), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            answer = json.loads(response.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    predictions = answer["predictions"]
    if isinstance(predictions, dict):
        predictions = predictions["probabilities"]
    probs = np.asarray(predictions, dtype=np.float64)
    assert probs.shape == (4, 2)
    assert (probs >= 0).all() and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_predict_on_study_images_matches_the_adapt_stage(study, sh) -> None:  # noqa: ANN001
    manifest = study.path / "data" / "tasks" / TASK / "metadata.csv"
    out = study.path / "predict" / "hospital_dr.csv"
    proc = sh(
        ["retfm", "predict", str(manifest), "--model", f"models:/{CLASSIFIER}@candidate",
         "--out", str(out)],
        study.path,
    )  # fmt: skip
    assert " 0 skipped" in proc.stdout
    table = pd.read_csv(out)
    meta = pd.read_csv(manifest)
    assert len(table) == len(meta) and (table["status"] == "ok").all()
    table["image_id"] = table["path"].map(lambda p: Path(p).stem)

    adapt_dir = study.path / "outputs" / "adapt" / FM / TASK
    runs = json.loads((adapt_dir / "runs.json").read_text())
    adapt = pd.read_parquet(adapt_dir / "predictions.parquet")
    adapt = adapt[adapt["seed"] == runs["best_seed"]]  # the seed that was registered
    joined = adapt.merge(table, on="image_id", suffixes=("_adapt", "_predict"))
    assert len(joined) == len(adapt) > 0  # every test image of the task is comparable
    k = len(runs["classes"])
    diff = max(
        np.abs(joined[f"prob_{i}_adapt"] - joined[f"prob_{i}_predict"]).max() for i in range(k)
    )
    assert diff < 1e-3, f"retfm predict differs from the adapt stage by {diff:.2g}"
    assert set(table["predicted"].astype(str)) <= set(runs["classes"])


def test_promote_reads_the_study_evaluation_and_reports_every_gate(study, sh) -> None:  # noqa: ANN001
    proc = sh(["retfm", "promote", f"fm-{FM}"], study.path, check=False)
    gates = re.findall(r"\[(PASS|FAIL)\] (.+?): ", proc.stdout)
    names = {name for _, name in gates}
    assert {"lineage complete", "auroc floor", "sex gap", "age groups judgeable"} <= names
    assert ("PASS", "lineage complete") in gates  # the pipeline records complete lineage
    all_pass = all(mark == "PASS" for mark, _ in gates)
    assert proc.returncode == (0 if all_pass else 1), proc.stdout + proc.stderr
    client = MlflowClient(study.tracking_uri, study.tracking_uri)
    aliases = client.get_registered_model(f"fm-{FM}").aliases
    assert ("champion" in aliases) == all_pass
    last = json.loads(
        client.get_model_version_by_alias(f"fm-{FM}", "candidate").tags["promotion.last"]
    )
    assert last["promoted"] == all_pass


def test_a_classifier_is_promoted_with_other_settings_recorded_then_rolled_back(study, sh) -> None:  # noqa: ANN001, E501
    """The study's own settings first (recorded on the version); then, refused, a looser
    promotion file only with --allow-other-settings, recorded as such; then a rollback."""
    model = CLASSIFIER
    client = MlflowClient(study.tracking_uri, study.tracking_uri)
    tags = client.get_model_version_by_alias(model, "candidate").tags
    assert tags["eval/auroc"] and "eval.promotion_settings" in tags  # classifiers are evaluated
    loose = study.path / "loose.yaml"
    params = (study.path / "params.yaml").read_text()
    loose.write_text(params.replace("floor: 0.6", "floor: 0.0").replace("max_gap: 0.25",
                                                                       "max_gap: 1.0"))  # fmt: skip
    refused = sh(["retfm", "promote", model, "--params", str(loose)], study.path, check=False)
    assert refused.returncode == 1
    assert "[FAIL] promotion settings are the study's: OTHER settings" in refused.stdout
    allowed = sh(["retfm", "promote", model, "--params", str(loose), "--allow-other-settings"],
                 study.path, check=False)  # fmt: skip
    # tiny test sets leave groups undefined that even these settings do not exclude
    granted = allowed.returncode == 0
    assert ("PROMOTED" in allowed.stdout) == granted, allowed.stdout
    last = json.loads(client.get_model_version_by_alias(model, "candidate").tags["promotion.last"])
    assert last["settings"]["max_gap"] == 1.0  # the record says which settings were applied
    if granted:
        back = sh(["retfm", "rollback", model], study.path)
        assert (
            "ROLLED BACK" in back.stdout
            and "champion" not in client.get_registered_model(model).aliases
        )
