"""Stage adapt@<fm>-r<k>-<task>: adapt one FM replicate to one downstream task, for every seed.

Each seed is an MLflow run (experiment ``adapt``) under the study's parent run, tagged so that
``mlflow ui`` Compare lines runs up by FM, replicate, site, recipe, task, alignment and seed.
The best seed's classifier (on the validation split) is exported to ONNX and registered as
``clf-<task>-fm-<fm>-r<k>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import typer
from mlflow.entities import Metric
from safetensors.torch import save_file

from retfm import tracking
from retfm.data.shards import PackedSet
from retfm.fms import Replicate, get_replicate
from retfm.models.encoder import Preprocessing, canonical_safetensors, load_encoder
from retfm.models.onnx_export import export_onnx, onnx_parity
from retfm.registry.lineage import fm_lineage_tags, weights_digest
from retfm.registry.models import recorded_version, register_onnx, write_registration
from retfm.settings import Settings, load_settings
from retfm.stage import stage
from retfm.training.adapt import AdaptResult, adapt
from retfm.training.features import extract_features


@stage("adapt")
def main(name: str, task: str) -> None:
    settings = load_settings()
    fm = get_replicate(settings, name)
    outputs, cfg = settings.paths.outputs, settings.adapt
    registration = json.loads((outputs / "register" / fm.name / "registration.json").read_text())
    weights = outputs / "pretrain" / fm.name / "encoder.safetensors"
    images = PackedSet(outputs / "packed" / "tasks" / task)
    meta = images.meta.reset_index(drop=True)
    task_sites = sorted(meta["source_site"].astype(str).unique())
    if len(task_sites) != 1:
        raise ValueError(f"task {task}: expected one source_site, found {task_sites}")
    task_site = task_sites[0]

    client = tracking.configure(settings)
    fm_version = recorded_version(client, registration)
    encoder, _, prep, _ = load_encoder(weights)
    features = extract_features(encoder, prep, images) if cfg.method == "mae_linprobe" else None
    parent = tracking.study_parent_run(settings)
    out = outputs / "adapt" / fm.name / task
    out.mkdir(parents=True, exist_ok=True)
    aligned = fm.aligned_with(task_site)
    tags = {
        **fm.tags(),
        "fm.version": fm_version,
        "task": task,
        "task.site": task_site,
        "aligned": str(aligned).lower(),
        "adaptation": cfg.method,
        "stage": "adapt",
    }
    frames, runs, run_ids, best = [], {}, {}, None
    inputs = (weights_digest(weights)[:16], images.fingerprint[:16], settings.digest("adapt"))
    for seed in cfg.seeds:
        runs[str(seed)] = tracking.run_key("adapt", fm.name, task, f"seed{seed}", *inputs)
        with tracking.run(
            settings,
            "adapt",
            name=f"{task} | {fm.label} | seed {seed}",  # the task first: the UI cuts long names
            tags={**tags, "seed": str(seed)},
            parent_run_id=parent,
            key=runs[str(seed)],
        ) as active:  # the run spans the training, so MLflow shows its real duration
            tracking.log_dataset(meta, name=f"task-{task}", source=str(images.folder),
                                 digest=images.fingerprint, context="downstream",
                                 targets="label")  # fmt: skip
            result = adapt(weights, images, meta, cfg, seed=seed, features=features)
            mlflow.log_params({k: str(v) for k, v in cfg.model_dump().items() if k != "seeds"})
            # what the runs differ in, as params: Compare's "show diff only" and the parallel
            # coordinates plot read params, not tags
            mlflow.log_params(
                {
                    "fm": fm.fm.name,
                    "fm_replicate": fm.index,
                    "fm_run": fm.name,
                    "fm_site": fm.site,
                    "fm_recipe": fm.recipe,
                    "fm_version": fm_version,
                    "task": task,
                    "task_site": task_site,
                    "aligned": str(aligned).lower(),
                }
            )
            mlflow.log_params({"seed": seed, "classes": ",".join(result.classes)})
            _log_history(tracking.configure(settings), active.info.run_id, result.history)
            mlflow.log_metrics(
                {
                    "best_val_score": result.best_val_score,
                    "best_val_auroc": result.best_val_auroc,
                    "best_epoch": result.best_epoch,
                }
            )
            run_ids[str(seed)] = active.info.run_id
        frames.append(result.predictions.assign(seed=seed))
        if best is None or result.best_val_score > best[1].best_val_score:
            best = (seed, result)
    client.set_terminated(parent, "FINISHED")  # the study's parent ends with its last child
    predictions = pd.concat(frames, ignore_index=True)
    predictions.to_parquet(out / "predictions.parquet", index=False)
    assert best is not None
    reg = _register_classifier(
        settings, fm, task, best[0], best[1], tags, run_ids[str(best[0])], prep, out
    )
    tracking.write_json(
        out / "runs.json",
        {
            "fm": fm.fm.name,
            "replicate": fm.index,
            "run": fm.name,
            "fm_site": fm.site,
            "fm_recipe": fm.recipe,
            "task": task,
            "task_site": task_site,
            "aligned": aligned,
            "adaptation": cfg.method,
            "classes": best[1].classes,
            "runs": runs,
            "best_seed": best[0],
            "classifier": reg,
        },
    )
    print(
        f"adapt {fm.label} -> {task}: {len(cfg.seeds)} seeds ({cfg.method}), best val AUROC "
        f"{best[1].best_val_auroc:.3f}, score {best[1].best_val_score:.3f} (seed {best[0]})"
    )


#: Per-epoch curves of an adaptation run, as MLflow metrics (step = epoch).
CURVES = ("train_loss", "val_loss", "val_auroc", "val_f1", "val_kappa", "val_score", "lr")


def _log_history(client, run_id: str, history: list[dict[str, float]]) -> None:  # noqa: ANN001
    now = mlflow.utils.time.get_current_time_millis()
    rows = [Metric(k, float(h[k]), now, int(h["epoch"])) for h in history for k in CURVES
            if k in h]  # fmt: skip
    for start in range(0, len(rows), 1000):
        client.log_batch(run_id, metrics=rows[start : start + 1000])


def _register_classifier(
    settings: Settings,
    fm: Replicate,
    task: str,
    seed: int,
    result: AdaptResult,
    tags: dict[str, str],
    run_id: str,
    prep: Preprocessing,
    out: Path,
) -> dict:
    """Export the best seed's classifier to ONNX and register it with its lineage."""
    clf = result.classifier.eval()
    size = prep.img_size
    onnx_path = export_onnx(clf, prep, out / "classifier.onnx", output_name="probabilities")
    parity = onnx_parity(clf, onnx_path)
    clf_weights = out / "classifier.safetensors"
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(clf_weights))
    canonical_safetensors(clf_weights)
    example = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.inference_mode():
        probs = clf(torch.from_numpy(example)).numpy()
    fm_run = json.loads((settings.paths.outputs / "pretrain" / fm.name / "run.json").read_text())
    lineage = {
        **tracking.base_tags(settings),
        **fm_lineage_tags(fm, fm_run),
        **tags,
        "seed": str(seed),
        "classes": ",".join(result.classes),
    }
    name = fm.classifier_name(task)
    reg = register_onnx(
        tracking.configure(settings),
        name=name,
        onnx_path=onnx_path,
        weights_path=clf_weights,
        run_id=run_id,
        parity=parity,
        input_example=example,
        output_example=probs,
        metadata={
            "preprocessing": json.loads(prep.to_json()),
            "classes": result.classes,
            "output": "probabilities",
            "fm": fm.model_name,
            "task": task,
        },
        tags=lineage,
        attachments={},
        description=f"{task} classifier ({settings.adapt.method}) on {fm.model_name} "
        f"({fm.label}), seed {seed}.",
        model_description=(
            f"Classifier for task `{task}` ({len(result.classes)} classes: "
            f"{', '.join(result.classes)}) adapted from foundation model `{fm.model_name}` "
            f"({fm.label}) with RETFound's recipe (`adapt.method: {settings.adapt.method}`); "
            "each version is the selected seed of one adaptation. Input: RGB images, "
            "preprocessed as in the version's `preprocessing` metadata; output: class "
            "probabilities. `retfm predict` runs it on a folder of images."
        ),
    )
    write_registration(out / "classifier_registration.json", reg)
    return json.loads((out / "classifier_registration.json").read_text())


if __name__ == "__main__":
    typer.run(main)
