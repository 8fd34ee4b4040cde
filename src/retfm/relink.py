"""Move a finished study onto another MLflow tracking store, without retraining.

Stage outputs name MLflow runs by a content key (``retfm.key``) and registry versions by their
weights, never by one store's ids. A study reproduced against one store and then pointed at
another (the embedded ``mlruns/`` store moved onto the team server) therefore finds none of its
runs there, and the stages that look them up stop at the door with a message naming this
command. ``retfm relink`` records the study in the current store:

1. each pre-training run, from its stage outputs (``run.json``, ``history.csv``, ``loss.png``):
   the weights are not retrained, the new run carries the same key and a ``retfm.relinked`` tag;
2. every stage that writes to the tracking store (validate, cohort, register, adapt, evaluate,
   compare), forced to rerun in pipeline order with ``dvc repro --force --single-item``. These
   stages are deterministic, so their outputs, ``dvc.lock`` and the git-tracked metrics come out
   byte-identical (``tests/e2e/test_records.py`` checks this), and on the way they register both
   FMs and every classifier and log their runs in the new store.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Metric

from retfm import tracking
from retfm.fms import study_replicates
from retfm.lanes import dvc_executable, stage_names
from retfm.settings import Settings

#: Stages that log to the tracking store, in pipeline order; pre-training is relinked from its
#: outputs instead (a rerun would retrain).
TRACKED_STAGES = ("validate", "cohort", "register", "adapt", "evaluate", "compare")


def relink_pretraining(settings: Settings, root: Path = Path(".")) -> list[str]:
    """Record each FM's pre-training (or import) run in the current store from its stage
    outputs. Returns the FMs recorded now (one whose keyed run is already here is left alone).
    """
    done = []
    for fm in study_replicates(settings):
        out = root / settings.paths.outputs / "pretrain" / fm.name
        record_path = out / "run.json"
        if not record_path.is_file():
            raise FileNotFoundError(
                f"{record_path}: no pre-training record; run `dvc repro pretrain@{fm.name}` "
                "(or `dvc pull`) first"
            )
        record = json.loads(record_path.read_text())
        key = record["mlflow_key"]
        try:
            tracking.keyed_run_id(settings, "pretrain", key)
            continue  # already recorded in this store
        except tracking.RunNotInStoreError:
            pass
        tags = {
            **fm.tags(),
            "recipe": str(record.get("recipe", "")),
            "recipe.hash": str(record.get("recipe_hash", "")),
            "cohort.fingerprint": str(record.get("cohort_fingerprint", "")),
            "stage": "pretrain",
            "retfm.relinked": "true",
        }
        verb = "import" if fm.imported else "pretrain"
        with tracking.run(settings, "pretrain", name=f"{verb} {fm.label}", tags=tags, key=key):
            mlflow.log_params({"steps": record.get("steps"), "seed": fm.seed})
            history = out / "history.csv"
            if history.is_file():
                _log_history(history)
            if record.get("final_loss") is not None:
                mlflow.log_metric("final_loss", float(record["final_loss"]))
            for name in ("loss.png", "history.csv"):
                if (out / name).is_file():
                    mlflow.log_artifact(str(out / name))
        done.append(fm.name)
    return done


def _log_history(path: Path) -> None:
    table = pd.read_csv(path)
    if table.empty or "step" not in table:
        return
    metrics = [c for c in ("loss", "lr") if c in table]
    client = mlflow.tracking.MlflowClient()
    run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr]

    rows = [
        Metric(m, float(v), 0, int(s))
        for m in metrics
        for s, v in zip(table["step"], table[m], strict=True)
    ]
    for start in range(0, len(rows), 1000):
        client.log_batch(run_id, metrics=rows[start : start + 1000])


def tracked_stages(names: list[str]) -> list[str]:
    """The stages :func:`relink` reruns, in :data:`TRACKED_STAGES` order."""
    return [s for kind in TRACKED_STAGES for s in names if s.split("@")[0] == kind]


def relink(
    settings: Settings, root: Path = Path("."), echo: Callable[[str], None] = print
) -> list[str]:
    """Record the study in the current tracking store; returns the stages rerun."""
    for name in relink_pretraining(settings, root):
        echo(f"pretrain@{name}: recorded from its outputs (not retrained)")
    stages = tracked_stages(stage_names(root))
    dvc = dvc_executable()
    for stage in stages:
        echo(f"{stage}: rerunning against {tracking.tracking_uri(settings)}")
        proc = subprocess.run(
            [dvc, "repro", "--force", "--single-item", stage], cwd=root,
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode:
            raise RuntimeError(
                f"dvc repro --force --single-item {stage} failed:\n"
                f"{(proc.stdout + proc.stderr)[-3000:]}"
            )
    return stages
