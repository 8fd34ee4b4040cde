"""Stage pretrain@<site>: one MAE foundation model per site, identical recipe for every site.

Resumable: checkpoints live outside the stage's outs (``outputs/checkpoints``), keyed by the
packed cohort's fingerprint, so a killed run continues where it stopped, into the same MLflow
run. Under ``torchrun`` every rank trains; only rank 0 tracks and writes outputs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import mlflow
import typer

from retfm import tracking
from retfm.data.shards import PackedSet
from retfm.models.checkpoints import import_mae
from retfm.models.encoder import Preprocessing, save_encoder
from retfm.registry.lineage import sha256_file
from retfm.reporting.plots import plot_loss
from retfm.settings import Settings, load_settings
from retfm.stage import stage
from retfm.training.pretrain import read_checkpoint_extra, train_mae


@stage("pretrain")
def main(site: str) -> None:
    settings = load_settings()
    outputs = settings.paths.outputs
    images = PackedSet(outputs / "packed" / "cohorts" / site)
    arch, cfg = settings.model.arch, settings.pretrain
    prep = (
        Preprocessing(arch.img_size, tuple(images.mean), tuple(images.std))
        if cfg.normalisation == "cohort"
        else Preprocessing(arch.img_size)
    )
    ckpt_dir = outputs / "checkpoints" / "pretrain" / site / images.fingerprint[:16]
    out = outputs / "pretrain" / site
    rank = int(os.environ.get("RANK", "0"))
    recipe_hash = settings.digest("model", "pretrain")
    tags = {
        "fm.site": site,
        "recipe": cfg.recipe,
        "recipe.hash": recipe_hash,
        "cohort.fingerprint": images.fingerprint,
        "stage": "pretrain",
    }

    if site in cfg.imported:
        _import_released(settings, site, Path(cfg.imported[site]), out, tags)
        return
    if rank != 0:  # other DDP ranks train without tracking
        train_mae(cfg, arch, images, ckpt_dir, seed=settings.study.seed, prep=prep, progress=False)
        return

    previous = read_checkpoint_extra(ckpt_dir) or {}
    key = tracking.run_key("pretrain", site, images.fingerprint[:16], recipe_hash,
                           f"seed{settings.study.seed}")  # fmt: skip
    with tracking.run(
        settings,
        "pretrain",
        name=f"pretrain-{site}",
        tags=tags,
        run_id=previous.get("mlflow_run_id"),
        key=key,
    ) as active:
        run_id = active.info.run_id
        if not previous:
            mlflow.log_params({f"arch.{k}": v for k, v in arch.model_dump().items()})
            mlflow.log_params({k: str(v) for k, v in cfg.model_dump().items()})
            mlflow.log_params({"cohort.images": len(images), "seed": settings.study.seed})
        sender = tracking.BufferedMetricLogger(tracking.configure(settings), run_id)
        try:
            result = train_mae(
                cfg,
                arch,
                images,
                ckpt_dir,
                seed=settings.study.seed,
                prep=prep,
                log_fn=sender.log,
                extra={"mlflow_run_id": run_id},
            )
        finally:
            sender.close()
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.encoder_path, out / "encoder.safetensors")
        shutil.copyfile(ckpt_dir / "history.csv", out / "history.csv")
        plot_loss(out / "history.csv", out / "loss.png", title=f"MAE pre-training, site {site}")
        mlflow.log_metric("final_loss", result.final_loss)
        mlflow.log_artifact(str(out / "loss.png"))
        mlflow.log_artifact(str(out / "history.csv"))
        tracking.write_json(
            out / "run.json",
            {
                "mlflow_key": key,
                "site": site,
                "steps": result.steps,
                "final_loss": result.final_loss,
                "recipe": cfg.recipe,
                "recipe_hash": recipe_hash,
                "preprocessing": prep.to_json(),
                "cohort_fingerprint": images.fingerprint,
            },
        )
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: a rerun with new data starts fresh
    print(f"pretrain {site}: {result.steps} steps, final loss {result.final_loss:.4f}")


def _import_released(
    settings: Settings, site: str, path: Path, out: Path, tags: dict[str, str]
) -> None:
    """Use a released RETFound MAE checkpoint as this site's FM instead of pre-training.

    Both sites' imports share one recipe hash (the released recipe), so the comparison stage
    treats them as made by an identical process, as their authors did.
    """
    encoder, arch, prep = import_mae(path)
    if arch.img_size != settings.pack.image_size:
        raise ValueError(
            f"{path}: encoder input is {arch.img_size}px but pack.image_size is "
            f"{settings.pack.image_size}; use a profile with that size (paper)"
        )
    weights_sha = sha256_file(path)
    recipe, recipe_hash = (
        "released-retfound-mae",
        hashlib.sha256(arch.model_dump_json().encode()).hexdigest()[:16],
    )
    out.mkdir(parents=True, exist_ok=True)
    save_encoder(
        out / "encoder.safetensors",
        encoder,
        arch,
        prep,
        {"imported_from": path.name, "source.sha256": weights_sha},
    )
    (out / "history.csv").write_text("step,epoch,loss,lr\n")
    plot_loss(out / "history.csv", out / "loss.png", title=f"{site}: imported, not trained")
    key = tracking.run_key("pretrain", site, "imported", weights_sha[:16])
    with tracking.run(
        settings,
        "pretrain",
        name=f"import-{site}",
        key=key,
        tags={
            **tags,
            "recipe": recipe,
            "recipe.hash": recipe_hash,
            "cohort.fingerprint": "imported",
            "imported_from": path.name,
            "source.sha256": weights_sha,
        },
    ):
        tracking.write_json(
            out / "run.json",
            {
                "mlflow_key": key,
                "site": site,
                "steps": 0,
                "final_loss": None,
                "recipe": recipe,
                "recipe_hash": recipe_hash,
                "preprocessing": prep.to_json(),
                "cohort_fingerprint": "imported",
                "imported_from": str(path),
            },
        )
    print(
        f"pretrain {site}: imported {path.name} (ViT {arch.embed_dim}d x {arch.depth}), not trained"
    )


if __name__ == "__main__":
    typer.run(main)
