"""Stage register@<fm>-r<k>: ONNX export, parity check against PyTorch, and an
``fm-<fm>-r<k>`` registry version (one registered model per FM replicate) with its lineage
(data and cohort hashes, commit, params, recipe), data card and model card.
Alias ``candidate``; ``champion`` only through ``retfm promote``."""

from __future__ import annotations

import json

import numpy as np
import torch
import typer

from retfm import tracking
from retfm.fms import get_replicate
from retfm.models.encoder import encode, load_encoder
from retfm.models.onnx_export import export_onnx, onnx_parity
from retfm.registry.lineage import check_cohort_card, fm_lineage_tags, model_card
from retfm.registry.models import register_onnx, write_registration
from retfm.settings import load_settings
from retfm.stage import stage


@stage("register")
def main(name: str) -> None:
    settings = load_settings()
    fm = get_replicate(settings, name)
    outputs = settings.paths.outputs
    folder = outputs / "pretrain" / fm.name
    weights = folder / "encoder.safetensors"
    run = json.loads((folder / "run.json").read_text())
    data_card = json.loads((folder / "data_card.json").read_text())
    if not fm.imported:
        check_cohort_card(data_card, settings.cohort.model_dump(mode="json"), str(fm.cohort))

    encoder, spec, prep, _ = load_encoder(weights)
    out = outputs / "register" / fm.name
    onnx_path = export_onnx(encoder, prep, out / "encoder.onnx")
    parity = onnx_parity(encoder, onnx_path)
    tags = {**tracking.base_tags(settings), **fm_lineage_tags(fm, run)}
    example = (
        np.random.default_rng(0)
        .standard_normal((2, 3, spec.img_size, spec.img_size))
        .astype(np.float32)
    )
    with torch.inference_mode():
        features = encode(encoder, torch.from_numpy(example)).numpy()
    attachments = {
        "model_card.md": model_card(
            name=fm.model_name,
            fm=fm,
            tags=tags,
            preprocessing=json.loads(prep.to_json()),
            arch=spec.model_dump(),
            data_card=data_card,
        ),
        "data_card.json": json.dumps(data_card, indent=2, sort_keys=True),
    }
    client = tracking.configure(settings)
    source = (
        f"imported from {fm.source.name}"
        if fm.imported
        else f"pre-trained on the {fm.site} cohort {fm.cohort} (replicate {fm.index})"
    )
    reg = register_onnx(
        client,
        name=fm.model_name,
        onnx_path=onnx_path,
        weights_path=weights,
        run_id=tracking.keyed_run_id(settings, "pretrain", run["mlflow_key"]),
        parity=parity,
        input_example=example,
        output_example=features,
        metadata={
            "preprocessing": json.loads(prep.to_json()),
            "arch": spec.model_dump(),
            "output": "features",
            "fm": fm.fm.name,
            "replicate": fm.index,
            "run": fm.name,
            "site": fm.site,
            "recipe": fm.recipe,
        },
        tags=tags,
        attachments=attachments,
        description=f"{fm.recipe.upper()} ViT encoder, {source} ({run['recipe']}).",
        model_description=(
            f"Foundation model `{fm.fm.name}`, replicate {fm.index} (`{fm.name}`): a "
            f"{fm.recipe.upper()} "
            f"ViT encoder ({spec.embed_dim}-d features, {spec.img_size} px input) for site "
            f"`{fm.site}`, {source}. Input: normalised RGB images as in the version's "
            "`preprocessing` metadata; output: one feature vector per image. The model card "
            "(`model_card.md`) and data card (`data_card.json`) travel with each version; after "
            "`compare`, the version's description and `eval/...` tags hold the study's evaluation."
        ),
    )
    write_registration(out / "registration.json", reg)
    state = "new version" if reg.created else "unchanged, existing version"  # printed, not stored
    print(f"registered {fm.model_name} v{reg.version} ({state}); ONNX parity {parity:.2e}")


if __name__ == "__main__":
    typer.run(main)
