"""``retfm relink``: a study's pre-training runs recorded in another store from their outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from retfm import tracking
from retfm.fms import expansion
from retfm.relink import relink_pretraining, tracked_stages
from retfm.settings import ExpandedSettings, FMSpec, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_tracked_stages_come_in_pipeline_order_and_never_retrain() -> None:
    names = ["validate", "cohort@a", "pack_cohort@a", "pretrain@a", "register@a",
             "adapt@a-t", "evaluate", "compare"]  # fmt: skip
    assert tracked_stages(names) == [
        "validate",
        "cohort@a",
        "register@a",
        "adapt@a-t",
        "evaluate",
        "compare",
    ]


def test_pretraining_is_recorded_once_with_its_key_and_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    base = load_settings(ROOT / "params.yaml")
    fms = {"a": FMSpec(site="a", recipe="mae")}
    study = base.study.model_copy(update={"sites": ["a"], "fms": fms, "replicates": 1})
    expanded = ExpandedSettings.model_validate(expansion(study, base.paths.outputs))
    settings = base.model_copy(update={"study": study, "expanded": expanded})
    out = tmp_path / "outputs/pretrain/a-r0"
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"mlflow_key": "k-a", "steps": 3, "final_loss": 0.5}))
    (out / "history.csv").write_text("step,epoch,loss,lr\n1,0,0.9,0.1\n2,0,0.7,0.1\n3,1,0.5,0.1\n")
    assert relink_pretraining(settings, tmp_path) == ["a-r0"]
    assert relink_pretraining(settings, tmp_path) == []  # already here: left alone
    client = MlflowClient(uri)
    run_id = tracking.keyed_run_id(settings, "pretrain", "k-a")
    run = client.get_run(run_id)
    assert run.data.tags["retfm.relinked"] == "true" and run.data.metrics["final_loss"] == 0.5
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.9, 0.7, 0.5]
    (out / "run.json").unlink()
    with pytest.raises(FileNotFoundError, match="pretrain@a"):
        relink_pretraining(settings, tmp_path)
