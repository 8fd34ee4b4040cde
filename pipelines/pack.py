"""Stages pack_cohort@<site>-r<k> and pack_task@<task>: decode and resize every image once into
memory-mapped uint8 shards, so that no epoch decodes a PNG again.

A cohort is packed at the model's input size S (pre-training crops from the whole image); a
downstream task at RETFound's evaluation size (``eval_resize(S)``: 256 for 224), so that its
centre S x S is exactly RETFound's evaluation view and fine-tuning's random crops have the
margin they have in RETFound."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import typer

from retfm.data.shards import CARD, eval_resize, pack_images
from retfm.settings import load_settings
from retfm.stage import stage


@stage("pack")
def main(kind: str, name: str) -> None:
    if kind not in ("cohort", "task"):
        raise ValueError(f"kind must be 'cohort' or 'task', got {kind!r}")
    settings = load_settings()
    outputs, data = settings.paths.outputs, settings.paths.data
    if kind == "cohort":
        card = outputs / "cohorts" / name / "card" / "card.json"
        if not card.is_file():
            raise FileNotFoundError(f"{card}: no cohort {name!r}; run `dvc repro cohort@{name}`")
        meta = pd.read_parquet(outputs / "cohorts" / name / "cohort.parquet")
        root = data / "sites" / json.loads(card.read_text())["site"]  # the pool it was drawn from
    else:
        meta = pd.read_parquet(outputs / "validation" / "tasks" / f"{name}.parquet")
        root = data / "tasks" / name
    size = settings.pack.image_size if kind == "cohort" else eval_resize(settings.pack.image_size)
    packed = pack_images(
        meta,
        root,
        outputs / "packed" / f"{kind}s" / name,
        image_size=size,
        shard_size=settings.pack.shard_size,
        workers=settings.validation.workers,
        fundus_crop=settings.pack.fundus_crop,
    )
    if kind == "cohort":  # the cohort's data card travels with its images to the FM
        shutil.copyfile(outputs / "cohorts" / name / "card" / "card.json", packed.folder / CARD)
    print(f"packed {kind} {name}: {len(packed)} images at {size}px")


if __name__ == "__main__":
    typer.run(main)
