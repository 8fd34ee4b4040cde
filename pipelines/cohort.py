"""Stage cohort@<site>-r<k>: sample the site's pre-training cohort for replicate k, check it,
write its data card.

Equal size for every site, whole patients, seeded by the replicate (each replicate draws its own
cohort from the site's pool, with the same size and strategy); no patient of a held-out task
set of this site is ever sampled. The cohort suite (Great Expectations) re-checks that and
the cohort's age/sex mix before anything is packed or trained.
"""

from __future__ import annotations

import mlflow
import pandas as pd
import typer

from retfm import tracking
from retfm.cohorts.cards import build_card, write_card
from retfm.cohorts.sampling import sample_cohort
from retfm.settings import load_settings
from retfm.stage import stage
from retfm.validation.runner import validate_cohort


@stage("cohort")
def main(name: str) -> None:
    settings = load_settings()
    outputs = settings.paths.outputs
    if name not in settings.expanded.cohorts:
        raise ValueError(f"cohort {name!r} is not one of {list(settings.expanded.cohorts)}")
    spec = settings.expanded.cohorts[name]
    site = spec.site
    validated = outputs / "validation"
    pools = {s: pd.read_parquet(validated / "sites" / f"{s}.parquet") for s in settings.study.sites}
    heldout: set[str] = set()
    for task in settings.study.tasks:
        meta = pd.read_parquet(validated / "tasks" / f"{task}.parquet")
        heldout |= set(meta.loc[meta["source_site"] == site, "patient_id"].astype(str))

    cfg = settings.cohort
    result = sample_cohort(
        pools[site],
        site=site,
        size=cfg.images_per_site,
        strategy=cfg.strategy,
        balance_on=cfg.balance_on,
        per_patient_cap=cfg.per_patient_cap,
        allow_smaller=cfg.allow_smaller,
        exclude_patients=heldout,
        seed=spec.seed,
        age_edges=settings.evaluation.age_bins.get("age", [60.0]),
        pools=pools,
    )
    out = outputs / "cohorts" / name
    validate_cohort(
        result.cohort,
        pools[site],
        heldout,
        settings,
        out / "validation",
        site=site,
        docs_dir=outputs / "docs" / "cohorts" / name,  # run times: outside the DVC output
    )
    result.cohort.to_parquet(out / "cohort.parquet", index=False)
    card = build_card(
        result.cohort,
        site=site,
        report=result.report,
        data_hash=tracking.dvc_hash(settings.paths.data.with_suffix(".dvc")),
        settings_snapshot=settings.cohort.model_dump(mode="json"),
        replicate={"cohort": name, "replicate": spec.replicate, "seed": spec.seed},
        image_root=settings.paths.data / "sites" / site,
    )
    files = write_card(card, out / "card")
    tags = {"stage": "cohort", "fm.site": site, "cohort": name,
            "fm.replicate": str(spec.replicate)}  # fmt: skip
    with tracking.run(settings, "data", name=f"cohort-{name}", tags=tags):
        mlflow.log_params(
            {
                "images_per_site": cfg.images_per_site,
                "strategy": cfg.strategy,
                "replicate": spec.replicate,
                "seed": spec.seed,
            }
        )
        mlflow.log_metrics(
            {
                "cohort.images": len(result.cohort),
                "cohort.patients": result.cohort["patient_id"].nunique(),
            }
        )
        mlflow.log_artifacts(str(out / "card"), "data_card")
    print(
        f"cohort {name} ({site}, replicate {spec.replicate}): {len(result.cohort)} images, "
        f"{result.cohort['patient_id'].nunique()} patients -> {files.get('card.md', out)}"
    )


if __name__ == "__main__":
    typer.run(main)
