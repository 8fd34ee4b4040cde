"""Stage compare: whose pre-training data make the better FM on which task (each FM's
replicated pre-training runs pooled), which run is better than which (per run, labelled),
whether alignment matters, which metadata factors matter (one call:
:func:`retfm.evaluation.analysis.analyse_study`), how often those
decisions would be wrong at this study's design (simulated null studies), the study report, one
``study`` MLflow run linking every run it compared, and the ``eval.*`` tags on each FM version
that promotion gates read."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import typer

from retfm import tracking
from retfm.evaluation import comparison as cmp
from retfm.evaluation.alignment import alignment_matrix
from retfm.evaluation.analysis import AnalysisConfig, analyse_study, read_adaptations
from retfm.evaluation.calibration import calibrate_null
from retfm.evaluation.runs import groupings
from retfm.evaluation.simulation import design_from_predictions, draw_auroc_sd
from retfm.fms import fm_recipes, fm_sites, replicate_fms, study_fms, study_replicates
from retfm.registry.evaluation import description, evaluation_tags, settings_digest
from retfm.registry.models import logged_model_id, recorded_version
from retfm.reporting.plots import (
    plot_differences,
    plot_factor_effects,
    plot_heatmap,
    plot_subgroups,
)
from retfm.reporting.report import write_report
from retfm.reporting.summary import build_summary, print_summary
from retfm.settings import Settings, load_settings
from retfm.stage import stage


@stage("compare")
def main() -> None:
    started = time.time()
    settings = load_settings()
    outputs = settings.paths.outputs
    out = outputs / "study"
    fms = study_fms(settings)
    reps = study_replicates(settings)
    _check_recipes(settings)
    runs = pd.read_parquet(outputs / "evaluation" / "runs.parquet")
    groups = pd.read_parquet(outputs / "evaluation" / "groups.parquet")
    preds, task_sites = read_adaptations(outputs, [r.name for r in reps], settings.study.tasks)
    sites, recipes, replicate_of = fm_sites(fms), fm_recipes(fms), replicate_fms(reps)

    config = AnalysisConfig.from_settings(settings)
    analysis = analyse_study(
        preds, sites, task_sites, config, fm_recipes=recipes, replicate_of=replicate_of
    )
    calibration = None
    if settings.compare.calibration_studies:
        design = design_from_predictions(
            preds, sites, task_sites, fm_recipes=recipes, replicate_of=replicate_of
        )
        calibration = calibrate_null(
            design, config, settings.compare.calibration_studies, seed=settings.study.seed
        )
        calibration["draw_auroc_sd"] = {
            task: draw_auroc_sd(preds, replicate_of, task) for task in settings.study.tasks
        }

    factors = groupings(settings.evaluation)
    matrix = alignment_matrix(runs, sites)
    figures = {
        "alignment": [
            plot_heatmap(
                matrix,
                out / "figures" / "alignment.png",
                aligned={(fm, s) for fm, s in sites.items() if s in matrix.columns},
                title="FM x data site",
                label="mean AUROC",
            )
        ],
        "differences": [
            plot_differences(
                analysis.comparisons,
                out / "figures" / "differences.png",
                title="Whose pre-training data is better on each task (runs pooled)",
                xlabel="AUROC difference, mean over pre-training runs, 95% interval",
            )
        ],
        "run_differences": (
            [
                plot_differences(
                    analysis.run_comparisons,
                    out / "figures" / "run_differences.png",
                    title="Which pre-training run is better (per run pair)",
                )
            ]
            if len(analysis.run_comparisons)
            else []
        ),
        "subgroups": _subgroup_figures(groups, settings, out),
        "factors": (
            [
                plot_factor_effects(
                    analysis.factor_groups, analysis.factors, out / "figures" / "factors.png"
                )
            ]
            if len(analysis.factor_groups)
            else []
        ),
    }
    summary = build_summary(
        study=settings.study.name,
        profile=settings.profile,
        fms=fms,
        runs=runs,
        analysis=analysis,
        config=config,
        calibration=calibration,
        replicates={fm.name: [r.name for r in reps if r.fm.name == fm.name] for fm in fms},
    )
    tables = {
        "comparisons": analysis.comparisons,
        "run_comparisons": analysis.run_comparisons,
        "alignment": analysis.alignment,
        "factors": analysis.factors.drop(columns=["groups", "left_out"], errors="ignore"),
        "factor_groups": analysis.factor_groups,
        "fairness": _fairness_table(runs, factors),
    }
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_csv(out / "tables" / f"{name}.csv", index=False)
    matrix.to_csv(out / "tables" / "alignment_matrix.csv")
    md, html = write_report(summary, tables, figures, out)
    summary["report"] = str(html)
    tracking.write_json(out / "summary.json", summary)
    _track(settings, runs, groups, factors, summary, tables, out, started)
    print_summary(summary, sys.stdout)


def _check_recipes(settings: Settings) -> None:
    """FMs of one recipe must have been made by an identical process (their sites are what
    the comparison is about); FMs of different recipes are never compared with each other."""
    by_recipe: dict[str, dict[str, str]] = {}
    for rep in study_replicates(settings):
        run = json.loads((settings.paths.outputs / "pretrain" / rep.name / "run.json").read_text())
        by_recipe.setdefault(rep.recipe, {})[rep.name] = run["recipe_hash"]
    for recipe, hashes in by_recipe.items():
        if len(set(hashes.values())) > 1 and settings.compare.require_identical_recipe:
            raise ValueError(
                f"the {recipe} FMs were made with different recipes {hashes} (e.g. one "
                "imported, one pre-trained here, or other settings); comparing them confounds "
                "data with recipe (set compare.require_identical_recipe: false to compare anyway)"
            )


def _fairness_table(runs: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    rows = []
    for (fm, task), frame in runs.groupby(["fm", "task"], sort=True):
        for f in factors:
            rows.append(
                {
                    "fm": fm,
                    "task": task,
                    "factor": f,
                    "worst_auroc": frame.get(f"worst/auroc/{f}", pd.Series(dtype=float)).mean(),
                    "gap_auroc": frame.get(f"gap/auroc/{f}", pd.Series(dtype=float)).mean(),
                    "eod": frame.get(f"eod/{f}", pd.Series(dtype=float)).mean(),
                    "es_auc": frame.get(f"es_auc/{f}", pd.Series(dtype=float)).mean(),
                    "undefined_groups": int(frame.get(f"n_undefined/{f}", pd.Series([0.0])).max()),
                }
            )
    return pd.DataFrame(rows)


def _subgroup_figures(groups: pd.DataFrame, settings: Settings, out: Path) -> list[Path]:
    figs = []
    for task in settings.study.tasks:
        sub = groups[groups["task"] == task]
        agg = (
            sub.groupby(["fm", "factor", "group"], sort=False)
            .agg(
                estimate=("auroc", "mean"),
                lo=("auroc_lo", "mean"),
                hi=("auroc_hi", "mean"),
                defined=("defined", "all"),
                n=("n", "max"),
            )
            .reset_index()
        )
        agg["group"] = agg["factor"] + "=" + agg["group"].astype(str)
        figs.append(
            plot_subgroups(
                agg,
                out / "figures" / f"subgroups_{task}.png",
                title=f"{task}: AUROC per subgroup, every FM (mean over seeds)",
            )
        )
    return figs


def _track(  # noqa: ANN001
    settings: Settings,
    runs: pd.DataFrame,
    groups: pd.DataFrame,
    factors: list[str],
    summary: dict,
    tables: dict,
    out,
    started: float,
) -> None:
    client = tracking.configure(settings)
    fingerprints = {
        t: json.loads(
            (settings.paths.outputs / "packed" / "tasks" / t / "manifest.json").read_text()
        )["sha256"]
        for t in settings.study.tasks
    }
    eval_data = cmp.evaluation_data_hash(fingerprints)
    with tracking.run(
        settings,
        "study",
        name=f"compare-{settings.study.name}",
        tags={"stage": "compare", "eval.data": eval_data},
        started=started,
    ) as active:
        al = summary["alignment"]
        mlflow.log_metric("alignment.n_better", al["n_better"])
        mlflow.log_metric("alignment.n_decided", al["n_decided"])
        mlflow.log_metric("alignment.n_undetermined", al["n_undetermined"])
        mlflow.log_metric("replicates", summary["n_replicates"])
        for t in summary["tasks"]:
            for fm, value in t["auroc"].items():
                if value is not None:
                    mlflow.log_metric(f"auroc/{t['task']}/{fm}", value)
            for c in t["comparisons"]:
                if c["diff"] is not None:
                    mlflow.log_metric(f"diff/{t['task']}/{c['fm_a']}-{c['fm_b']}", c["diff"])
                if c["p_adj"] is not None:
                    mlflow.log_metric(f"p_adj/{t['task']}/{c['fm_a']}-{c['fm_b']}", c["p_adj"])
                mlflow.set_tag(f"verdict.{t['task']}.{c['fm_a']}-{c['fm_b']}", c["verdict"])
            for run, value in t.get("run_auroc", {}).items():
                if value is not None:
                    mlflow.log_metric(f"run_auroc/{t['task']}/{run}", value)
        compared = sorted(tracking.keyed_run_id(settings, "adapt", k) for k in runs["run_key"])
        mlflow.log_text("\n".join(compared), "compared_runs.txt")
        mlflow.set_tag("compared.runs", str(len(runs)))
        for f in summary["factors"]:
            mlflow.set_tag(f"factor.{f['factor']}", f["verdict"])
        for name, table in tables.items():
            mlflow.log_table(
                table.astype({c: str for c in table.columns if table[c].dtype == object}),
                f"tables/{name}.json",
            )
        mlflow.log_artifact(str(out / "report.html"))
        mlflow.log_artifact(str(out / "report.md"))
        mlflow.log_artifacts(str(out / "figures"), "figures")
        _log_images(out / "figures")
        study_run = active.info.run_id
    _tag_models(settings, client, runs, groups, factors, eval_data, study_run)


def _tag_models(  # noqa: ANN001, PLR0913
    settings: Settings, client, runs, groups, factors, eval_data: str, study_run: str
) -> None:
    """The evaluation on every promotable version: ``eval.*`` tags (read by the promotion
    gates), a description with the evaluation table, and the metrics linked to the version's
    logged model (MLflow's model view). FM versions: all their runs; classifier versions: the
    runs of the seed that was registered."""
    outputs = settings.paths.outputs
    common = {
        "eval_data": eval_data,
        "promotion_settings": settings_digest(settings.promotion.model_dump(mode="json")),
        "min_group_size": settings.evaluation.min_group_size,
    }
    models = []
    for rep in study_replicates(settings):
        reg = json.loads((outputs / "register" / rep.name / "registration.json").read_text())
        models.append((reg, runs[runs["run"] == rep.name]))
        for task in settings.study.tasks:
            info = json.loads((outputs / "adapt" / rep.name / task / "runs.json").read_text())
            mine = runs[(runs["run"] == rep.name) & (runs["task"] == task)
                        & (runs["seed"] == int(info["best_seed"]))]  # fmt: skip
            models.append((info["classifier"], mine))
    for reg, mine in models:
        version = recorded_version(client, reg)
        tags = evaluation_tags(mine, groups[groups["run_key"].isin(mine["run_key"])], factors,
                               **common)  # fmt: skip
        tags["eval.study_run"] = study_run
        for key, value in tags.items():
            client.set_model_version_tag(reg["name"], version, key, value)
        text = description(reg["name"], mine, tags, factors)
        mv = client.get_model_version(reg["name"], version)
        head = (mv.description or "").split("\n\n**Evaluation**")[0]
        client.update_model_version(reg["name"], version, description=f"{head}\n\n{text}")
        _link_metrics(client, mv, mine, tags, study_run)
        _evaluated_card(client, mv, text)


def _link_metrics(client, mv, runs: pd.DataFrame, tags: dict, study_run: str) -> None:  # noqa: ANN001
    """The version's evaluation as metrics of its logged model (MLflow 3's model page), logged
    from the study run, each with the test set it was measured on."""
    from mlflow.entities import Metric

    model_id = logged_model_id(mv)
    now = mlflow.utils.time.get_current_time_millis()
    metrics = [Metric(k.removeprefix("eval/"), float(v), now, 0, model_id=model_id,
                      dataset_name="test-sets", dataset_digest=tags["eval.data"])
               for k, v in tags.items() if k.startswith("eval/") and _is_number(v)]  # fmt: skip
    per_task = runs.groupby("task")["auroc"].mean()
    metrics += [Metric(f"auroc/{task}", float(v), now, 0, model_id=model_id,
                       dataset_name=str(task), dataset_digest=tags["eval.data"])
                for task, v in per_task.items()]  # fmt: skip
    client.log_batch(study_run, metrics=metrics)


def _evaluated_card(client, mv, evaluation: str) -> None:  # noqa: ANN001
    """The version's model card with its evaluation filled in (``extra_files/model_card.md``
    of its logged model, rewritten in place), plus ``evaluation.md`` for every version."""
    import tempfile

    model_id = logged_model_id(mv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "evaluation.md").write_text(evaluation + "\n")
        client.log_model_artifact(model_id, str(folder / "evaluation.md"), "extra_files")
        try:
            card = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{client.get_logged_model(model_id).artifact_location}"
                "/extra_files/model_card.md", dst_path=str(folder / "old")))  # fmt: skip
        except Exception:  # noqa: BLE001 - a classifier has no model card
            return
        text = card.read_text()
        if "## Evaluation" in text:
            before, _, rest = text.partition("## Evaluation")
            after = rest.split("\n## ", 1)[1] if "\n## " in rest else ""
            text = (
                f"{before}## Evaluation\n{evaluation}\n\n## {after}"
                if after
                else (f"{before}## Evaluation\n{evaluation}\n")
            )
        (folder / "model_card.md").write_text(text)
        client.log_model_artifact(model_id, str(folder / "model_card.md"), "extra_files")


def _log_images(folder: Path) -> None:
    """The study's figures as MLflow images (key ``figures/<name>``): the experiment's Chart
    view shows them at once, e.g. every FM's per-subgroup AUROC with intervals per task."""
    from PIL import Image

    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as img:
            mlflow.log_image(img.convert("RGB"), key=f"figures/{path.stem}", step=0)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    typer.run(main)
