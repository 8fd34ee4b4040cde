"""Stage register@<site>: ONNX export, parity check against PyTorch, and an ``fm-<site>``
registry version with its lineage (data and cohort hashes, commit, params, recipe), data card
and model card. Alias ``candidate``; ``champion`` only through ``retfm promote``."""

from __future__ import annotations

import json

import numpy as np
import torch
import typer

from retfm import tracking
from retfm.models.encoder import encode, load_encoder
from retfm.models.onnx_export import export_onnx, onnx_parity
from retfm.registry.lineage import check_cohort_card, model_card
from retfm.registry.models import register_onnx, write_registration
from retfm.settings import load_settings
from retfm.stage import stage


@stage("register")
def main(site: str) -> None:
    settings = load_settings()
    outputs = settings.paths.outputs
    weights = outputs / "pretrain" / site / "encoder.safetensors"
    run = json.loads((outputs / "pretrain" / site / "run.json").read_text())
    card_path = outputs / "cohorts" / site / "card" / "card.json"
    data_card = json.loads(card_path.read_text()) if card_path.is_file() else None
    if data_card is not None and not run.get("imported_from"):
        check_cohort_card(data_card, settings.cohort.model_dump(mode="json"), site)

    encoder, arch, prep, _ = load_encoder(weights)
    out = outputs / "register" / site
    onnx_path = export_onnx(encoder, prep, out / "encoder.onnx")
    parity = onnx_parity(encoder, onnx_path)

    name = f"fm-{site}"
    tags = {
        **tracking.base_tags(settings),
        "fm.site": site,
        "fm.model": name,
        "recipe": run["recipe"],
        "recipe.hash": run["recipe_hash"],
        "cohort.md5": (
            f"released:{run['imported_from']}"
            if run.get("imported_from")
            else tracking.lock_hash(f"cohort@{site}", f"outputs/cohorts/{site}")
        ),
        "cohort.fingerprint": run["cohort_fingerprint"],
    }
    example = (
        np.random.default_rng(0)
        .standard_normal((2, 3, arch.img_size, arch.img_size))
        .astype(np.float32)
    )
    with torch.inference_mode():
        features = encode(encoder, torch.from_numpy(example)).numpy()
    attachments = {
        "model_card.md": model_card(
            name=name,
            site=site,
            tags=tags,
            preprocessing=json.loads(prep.to_json()),
            arch=arch.model_dump(),
            data_card=data_card,
        )
    }
    if data_card is not None:
        attachments["data_card.json"] = json.dumps(data_card, indent=2, sort_keys=True)
    client = tracking.configure(settings)
    reg = register_onnx(
        client,
        name=name,
        onnx_path=onnx_path,
        weights_path=weights,
        run_id=tracking.keyed_run_id(settings, "pretrain", run["mlflow_key"]),
        parity=parity,
        input_example=example,
        output_example=features,
        metadata={
            "preprocessing": json.loads(prep.to_json()),
            "arch": arch.model_dump(),
            "output": "features",
            "site": site,
        },
        tags=tags,
        attachments=attachments,
        description=f"MAE ViT encoder pre-trained on the {site} cohort ({run['recipe']}).",
    )
    write_registration(out / "registration.json", reg)
    state = "new version" if reg.created else "unchanged, existing version"  # printed, not stored
    print(f"registered {name} v{reg.version} ({state}); ONNX parity {parity:.2e}")


if __name__ == "__main__":
    typer.run(main)
