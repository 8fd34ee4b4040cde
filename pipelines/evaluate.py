"""Stage evaluate: per-subgroup metrics, fairness gaps and bootstrap intervals for every
adaptation run (every FM replicate x task x seed), logged into that run (``auroc``,
``auroc/age/ge60``, ``n/sex/F``, ``gap/auroc/age`` ...) with the per-group tables, and gathered
into DVC metrics, one file per FM x task (over its replicates and seeds)."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import typer
from mlflow.entities import Metric

from retfm import tracking
from retfm.evaluation.runs import evaluate_predictions
from retfm.fms import study_replicates
from retfm.settings import load_settings
from retfm.stage import stage


@stage("evaluate")
def main() -> None:
    settings = load_settings()
    outputs = settings.paths.outputs
    client = tracking.configure(settings)
    run_rows, group_frames = [], []
    for rep in study_replicates(settings):
        for task in settings.study.tasks:
            folder = outputs / "adapt" / rep.name / task
            info = json.loads((folder / "runs.json").read_text())
            preds = pd.read_parquet(folder / "predictions.parquet")
            for seed, frame in preds.groupby("seed", sort=True):
                key = info["runs"][str(seed)]
                run_id = tracking.keyed_run_id(settings, "adapt", key)
                result = evaluate_predictions(
                    frame.drop(columns=["seed", "run_id"], errors="ignore"),
                    settings.evaluation,
                    seed=int(seed),
                )
                metrics = dict(result.keys.metrics)
                overall_ci = result.intervals.query("factor == 'overall' and metric == 'auroc'")
                if len(overall_ci):
                    metrics["auroc_lo"] = float(overall_ci["lo"].iloc[0])
                    metrics["auroc_hi"] = float(overall_ci["hi"].iloc[0])
                _log(client, run_id, metrics, result.groups, result.keys.undefined)
                context = {
                    "fm": rep.fm.name,
                    "replicate": rep.index,
                    "run": rep.name,
                    "fm_site": rep.site,
                    "fm_recipe": rep.recipe,
                    "task": task,
                    "task_site": info["task_site"],
                    "aligned": info["aligned"],
                    "seed": int(seed),
                    "run_key": key,
                }
                run_rows.append({**context, **metrics})
                group_frames.append(result.groups.assign(**context))
    runs = pd.DataFrame(run_rows)
    groups = pd.concat(group_frames, ignore_index=True)
    out = outputs / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    runs.to_parquet(out / "runs.parquet", index=False)
    groups.astype({c: str for c in groups.columns if groups[c].dtype == object}).to_parquet(
        out / "groups.parquet", index=False
    )
    _write_dvc_metrics(runs, out / "metrics")
    print(runs.groupby(["run", "task"])["auroc"].agg(["mean", "std"]).round(3).to_string())


def _log(
    client,
    run_id: str,
    metrics: dict[str, float],
    groups: pd.DataFrame,  # noqa: ANN001
    undefined: list[str],
) -> None:
    now = mlflow.utils.time.get_current_time_millis()
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for start in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[start : start + 1000])
    client.set_tag(run_id, "eval.undefined", ",".join(undefined)[:5000] or "none")
    table = groups.copy()
    for col in table.columns:
        if table[col].dtype == object:
            table[col] = table[col].astype(str)
    client.log_table(run_id, data=table, artifact_file="evaluation/groups.json")


def _write_dvc_metrics(runs: pd.DataFrame, folder) -> None:  # noqa: ANN001
    """Mean over replicates and seeds, one file per FM x task (``<fm>.<task>.json``), so that
    ``dvc metrics show`` prints one row per FM and task and ``dvc metrics diff`` compares two
    versions of the study; ``auroc_sd`` is the sd over every run, ``auroc_replicate_sd`` the sd
    of the replicates' seed means (the pre-training draw). Keys are spelled as the MLflow
    metrics (``gap/auroc/age``)."""
    keep = [
        c
        for c in runs.columns
        if c in ("auroc", "aupr", "accuracy", "f1_macro", "kappa", "ece")
        or c.startswith(("gap/auroc/", "worst/auroc/"))
    ]
    folder.mkdir(parents=True, exist_ok=True)
    written = set()
    for (fm, task), frame in runs.groupby(["fm", "task"], sort=True):
        entry = {}
        for col in keep:
            vals = frame[col].dropna().to_numpy(float)
            if len(vals):
                entry[col] = round(float(np.mean(vals)), 5)
        entry["auroc_sd"] = round(float(np.std(frame["auroc"], ddof=1)), 5) if len(frame) > 1 else 0
        means = frame.groupby("replicate")["auroc"].mean()
        entry["auroc_replicate_sd"] = round(float(means.std(ddof=1)), 5) if len(means) > 1 else 0
        name = f"{fm}.{task}.json"
        tracking.write_json(folder / name, entry)
        written.add(name)
    for stale in folder.glob("*.json"):  # an FM or task no longer in the study
        if stale.name not in written:
            stale.unlink()


if __name__ == "__main__":
    typer.run(main)
