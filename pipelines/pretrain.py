"""Stage pretrain@<fm>-r<k>: one pre-training run (replicate k) of a foundation model, made by
its recipe from the site's cohort for that replicate with the replicate's seed (identical
recipe for every site), or imported from a released checkpoint (one run).

Resumable: checkpoints live outside the stage's outs (``outputs/checkpoints``), keyed by the
packed cohort's fingerprint, so a killed run continues where it stopped, into the same MLflow
run. Under ``torchrun`` every rank trains; only rank 0 tracks and writes outputs. Besides the
encoder the stage writes ``run.json`` (what made it) and ``data_card.json`` (the cohort's data
card, or a card naming the released checkpoint), so that the FM's folder is its whole record.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import mlflow
import typer

from retfm import tracking
from retfm.data.shards import PackedSet
from retfm.fms import Replicate, get_replicate
from retfm.models.checkpoints import import_encoder
from retfm.models.encoder import Preprocessing, save_encoder
from retfm.registry.lineage import sha256_file
from retfm.reporting.plots import plot_loss
from retfm.settings import Settings, load_settings
from retfm.stage import stage
from retfm.training.pretrain import pretrain_fm, read_checkpoint_extra


@stage("pretrain")
def main(name: str) -> None:
    settings = load_settings()
    fm = get_replicate(settings, name)
    out = settings.paths.outputs / "pretrain" / fm.name
    if fm.imported:
        _import_released(settings, fm, out)
        return
    _pretrain(settings, fm, out)


def _pretrain(settings: Settings, fm: Replicate, out: Path) -> None:
    outputs = settings.paths.outputs
    images = PackedSet(fm.source)
    arch, cfg = settings.model.arch, settings.pretrain
    stats = (tuple(images.mean), tuple(images.std)) if cfg.normalisation == "cohort" else ()
    prep = Preprocessing.retfound(arch.img_size, *stats, fundus_crop=settings.pack.fundus_crop)
    ckpt_dir = outputs / "checkpoints" / "pretrain" / fm.name / images.fingerprint[:16]
    rank = int(os.environ.get("RANK", "0"))
    recipe = cfg.recipe_settings(fm.recipe).recipe  # its name and version, e.g. mae-retfound-v1
    recipe_hash = settings.recipe_digest(fm.recipe)
    tags = {
        **fm.tags(),
        "recipe": recipe,
        "recipe.hash": recipe_hash,
        "cohort.fingerprint": images.fingerprint,
        "stage": "pretrain",
    }
    if rank != 0:  # other DDP ranks train without tracking
        pretrain_fm(fm.recipe, cfg, arch, images, ckpt_dir, seed=fm.seed, prep=prep,
                    progress=False)  # fmt: skip
        return

    previous = read_checkpoint_extra(ckpt_dir) or {}
    key = tracking.run_key("pretrain", fm.name, images.fingerprint[:16], recipe_hash,
                           f"seed{fm.seed}")  # fmt: skip
    parent = _fm_parent(settings, fm, recipe_hash)
    with tracking.run(
        settings,
        "pretrain",
        name=f"pretrain {fm.label}",
        tags=tags,
        run_id=previous.get("mlflow_run_id"),
        parent_run_id=parent,
        key=key,
    ) as active:
        run_id = active.info.run_id
        if not previous:
            tracking.log_dataset(images.meta, name=f"cohort-{fm.cohort}", source=str(fm.source),
                                 digest=images.fingerprint, context="pre-training")  # fmt: skip
            mlflow.log_params({f"arch.{k}": v for k, v in arch.model_dump().items()})
            mlflow.log_params(_flat(cfg.for_recipe(fm.recipe)))
            mlflow.log_params({"fm": fm.fm.name, "fm_site": fm.site, "fm_recipe": fm.recipe,
                               "fm_replicate": fm.index, "fm_run": fm.name})  # fmt: skip
            mlflow.log_params({"cohort.images": len(images), "seed": fm.seed})
        sender = tracking.BufferedMetricLogger(tracking.configure(settings), run_id)
        try:
            result = pretrain_fm(
                fm.recipe,
                cfg,
                arch,
                images,
                ckpt_dir,
                seed=fm.seed,
                prep=prep,
                log_fn=sender.log,
                extra={"mlflow_run_id": run_id},
            )
        finally:
            sender.close()
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.encoder_path, out / "encoder.safetensors")
        shutil.copyfile(ckpt_dir / "history.csv", out / "history.csv")
        shutil.copyfile(images.folder / "card.json", out / "data_card.json")
        plot_loss(
            out / "history.csv", out / "loss.png", title=f"{fm.recipe} pre-training, {fm.label}"
        )
        mlflow.log_metric("final_loss", result.final_loss)
        mlflow.log_artifact(str(out / "loss.png"))
        mlflow.log_artifact(str(out / "history.csv"))
        tracking.write_json(
            out / "run.json",
            {
                "mlflow_key": key,
                "fm": fm.fm.name,
                "replicate": fm.index,
                "run": fm.name,
                "seed": fm.seed,
                "site": fm.site,
                "recipe_family": fm.recipe,
                "steps": result.steps,
                "final_loss": result.final_loss,
                "recipe": recipe,
                "recipe_hash": recipe_hash,
                "preprocessing": prep.to_json(),
                "cohort_fingerprint": images.fingerprint,
            },
        )
    tracking.configure(settings).set_terminated(parent, "FINISHED")  # ends with its last child
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: a rerun with new data starts fresh
    print(f"pretrain {fm.label}: {result.steps} steps, final loss {result.final_loss:.4f}")


def _fm_parent(settings: Settings, fm: Replicate, recipe_hash: str) -> str:
    """The run that groups an FM's replicates in the ``pretrain`` experiment (one per FM,
    recipe version and raw data version): the UI shows the replicates as its children."""
    key = f"{fm.fm.name}:{recipe_hash}:{tracking.dvc_hash(Path('data.dvc'))[:12]}"
    return tracking.parent_run(
        settings, "pretrain", "fm-parent", key, f"pretrain {fm.fm.label}",
        tags={**fm.fm.tags(), "stage": "pretrain"},
    )  # fmt: skip


def _flat(params: dict, prefix: str = "") -> dict[str, str]:
    """``{"dinov2": {"base_lr": 0.004}}`` -> ``{"dinov2.base_lr": "0.004"}`` (MLflow params)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def _import_released(settings: Settings, fm: Replicate, out: Path) -> None:
    """Use a released checkpoint as this FM instead of pre-training it.

    Imports of one recipe share one recipe hash (the released recipe and architecture), so the
    comparison stage treats them as made by an identical process, as their authors did.
    """
    path = fm.source
    imported = import_encoder(
        path, fm.recipe, img_size=settings.pack.image_size, num_heads=fm.num_heads
    )
    spec = imported.spec
    prep = replace(imported.prep, fundus_crop=settings.pack.fundus_crop)
    weights_sha = sha256_file(path)
    recipe = f"released-retfound-{fm.recipe}"
    arch = spec.model_dump_json(exclude={"img_size"})
    recipe_hash = hashlib.sha256(f"{recipe}|{arch}".encode()).hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    save_encoder(
        out / "encoder.safetensors",
        imported.encoder,
        spec,
        prep,
        {"imported_from": path.name, "source.sha256": weights_sha},
    )
    (out / "history.csv").write_text("step,epoch,loss,lr\n")
    plot_loss(out / "history.csv", out / "loss.png", title=f"{fm.label}: imported, not trained")
    card = {
        "imported": True,
        "fm": fm.fm.name,
        "site": fm.site,
        "recipe": fm.recipe,
        "checkpoint": {"file": path.name, "sha256": weights_sha, "layout": imported.layout},
        "architecture": imported.describe(),
        "dropped_keys": imported.dropped,
        "note": "pre-trained elsewhere: its pre-training data are described by its release",
    }
    tracking.write_json(out / "data_card.json", card)
    key = tracking.run_key("pretrain", fm.name, "imported", weights_sha[:16],
                           str(settings.pack.image_size))  # fmt: skip
    with tracking.run(
        settings,
        "pretrain",
        name=f"import {fm.label}",
        key=key,
        tags={
            **fm.tags(),
            "stage": "pretrain",
            "recipe": recipe,
            "recipe.hash": recipe_hash,
            "cohort.fingerprint": "imported",
            "imported_from": path.name,
            "source.sha256": weights_sha,
        },
    ):
        mlflow.log_params({"fm": fm.fm.name, "fm_site": fm.site, "fm_recipe": fm.recipe,
                           "fm_replicate": 0, "fm_run": fm.name, "checkpoint": path.name,
                           "layout": imported.layout,
                           **{f"arch.{k}": v for k, v in spec.model_dump().items()}})  # fmt: skip
        mlflow.log_text(json.dumps(card, indent=2), "data_card.json")
        tracking.write_json(
            out / "run.json",
            {
                "mlflow_key": key,
                "fm": fm.fm.name,
                "replicate": 0,
                "run": fm.name,
                "seed": None,
                "site": fm.site,
                "recipe_family": fm.recipe,
                "steps": 0,
                "final_loss": None,
                "recipe": recipe,
                "recipe_hash": recipe_hash,
                "preprocessing": prep.to_json(),
                "cohort_fingerprint": "imported",
                "imported_from": str(path),
            },
        )
    print(f"pretrain {fm.label}: imported {path.name}, not trained: {imported.describe()}")


if __name__ == "__main__":
    typer.run(main)
