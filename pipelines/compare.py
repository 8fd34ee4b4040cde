"""Stage compare: which FM is better on which task, whether alignment matters, which metadata
factors matter; the study report; one ``study`` MLflow run linking every run it compared; and
the ``eval.*`` tags on each FM version that promotion gates read."""

from __future__ import annotations

import json
import sys

import mlflow
import numpy as np
import pandas as pd
import typer

from retfm import tracking
from retfm.evaluation import comparison as cmp
from retfm.evaluation.runs import groupings
from retfm.reporting.plots import plot_heatmap, plot_subgroups
from retfm.reporting.report import write_report
from retfm.reporting.summary import print_summary
from retfm.settings import Settings, load_settings
from retfm.stage import stage


@stage("compare")
def main() -> None:
    settings = load_settings()
    outputs = settings.paths.outputs
    out = outputs / "study"
    _check_recipes(settings)
    runs = pd.read_parquet(outputs / "evaluation" / "runs.parquet")
    groups = pd.read_parquet(outputs / "evaluation" / "groups.parquet")
    preds, infos = {}, {}
    for fm in settings.study.sites:
        for task in settings.study.tasks:
            folder = outputs / "adapt" / fm / task
            preds[(fm, task)] = cmp.seed_average(pd.read_parquet(folder / "predictions.parquet"))
            infos[(fm, task)] = json.loads((folder / "runs.json").read_text())

    rows = []
    for task in settings.study.tasks:
        by_fm = {fm: preds[(fm, task)] for fm in settings.study.sites}
        rows += cmp.compare_task(
            task,
            runs[runs["task"] == task],
            by_fm,
            n_boot=settings.evaluation.n_boot,
            seed=settings.study.seed,
        )
    significance = cmp.significance_table(rows, settings.compare.alpha)
    align = cmp.alignment(runs, settings.compare.alpha, list(settings.study.tasks))
    factors = groupings(settings.evaluation)
    factor_table = cmp.pooled_factor_effects(preds, settings, factors)
    fairness = _fairness_table(runs, factors)

    figures = {
        "alignment": [
            plot_heatmap(
                align["matrix"],
                out / "figures" / "alignment.png",
                title="FM site x data site",
                label="mean AUROC",
            )
        ],
        "subgroups": _subgroup_figures(groups, settings, out),
    }
    summary = _summary(settings, runs, significance, align, factor_table, infos)
    tables = {
        "significance": significance,
        "factors": _factor_view(factor_table),
        "fairness": fairness,
    }
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_csv(out / "tables" / f"{name}.csv", index=False)
    align["matrix"].to_csv(out / "tables" / "alignment_matrix.csv")
    md, html = write_report(summary, tables, figures, out)
    summary["report"] = str(html)
    tracking.write_json(out / "summary.json", summary)
    _track(settings, runs, factors, summary, tables, out)
    print_summary(summary, sys.stdout)


def _check_recipes(settings: Settings) -> None:
    hashes = {
        fm: json.loads((settings.paths.outputs / "pretrain" / fm / "run.json").read_text())[
            "recipe_hash"
        ]
        for fm in settings.study.sites
    }
    if len(set(hashes.values())) > 1 and settings.compare.require_identical_recipe:
        raise ValueError(
            f"FMs were pre-trained with different recipes {hashes}; comparing them "
            "confounds data with recipe (set compare.require_identical_recipe: "
            "false to compare anyway)"
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


def _factor_view(table: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in table.columns if c not in ("groups", "left_out")]
    return table[keep]


def _subgroup_figures(groups: pd.DataFrame, settings: Settings, out) -> list:  # noqa: ANN001
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
            )
            .reset_index()
        )
        agg["group"] = agg["factor"] + "=" + agg["group"].astype(str)
        figs.append(
            plot_subgroups(
                agg, out / "figures" / f"subgroups_{task}.png", title=f"{task}: AUROC per subgroup"
            )
        )
    return figs


def _summary(settings, runs, significance, align, factor_table, infos) -> dict:  # noqa: ANN001
    fms = list(settings.study.sites)
    tasks = []
    for task in settings.study.tasks:
        frame = runs[runs["task"] == task]
        means = frame.groupby("fm")["auroc"].mean()
        sds = frame.groupby("fm")["auroc"].std(ddof=1).fillna(0.0)
        sig = significance[significance["task"] == task]
        site = str(frame["task_site"].iloc[0])
        tasks.append(
            {
                "task": task,
                "task_site": site,
                "auroc": {fm: round(float(means[fm]), 4) for fm in fms},
                "auroc_sd": {fm: round(float(sds[fm]), 4) for fm in fms},
                "better_fm": str(means.idxmax()),
                "aligned_fm": site if site in fms else None,
                "p_holm": None if sig.empty else float(sig["p_paired_holm"].min()),
                "significant": bool(sig["significant"].any()) if not sig.empty else False,
            }
        )
    return {
        "study": settings.study.name,
        "profile": settings.profile,
        "fms": fms,
        "n_seeds": len(settings.adapt.seeds),
        "tasks": tasks,
        "alignment": {
            "n_tasks": int(align["n_tasks"]),
            "n_better": int(align["n_better"]),
            "fraction": None if np.isnan(align["fraction"]) else align["fraction"],
            "better_tasks": align["better_tasks"],
        },
        "factors": [
            {
                "factor": r["factor"],
                "flagged": bool(r["perf_flagged"]),
                "gap_flagged": bool(r["gap_flagged"]),
                "p_adj": None if pd.isna(r["perf_p_adj"]) else float(r["perf_p_adj"]),
                "gap_p_adj": None if pd.isna(r["gap_p_adj"]) else float(r["gap_p_adj"]),
            }
            for _, r in factor_table.iterrows()
        ],
        "runs_compared": int(len(runs)),
    }


def _track(  # noqa: ANN001
    settings: Settings, runs: pd.DataFrame, factors: list[str], summary: dict, tables: dict, out
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
    ) as active:
        mlflow.log_metric("alignment.n_better", summary["alignment"]["n_better"])
        mlflow.log_metric("alignment.n_tasks", summary["alignment"]["n_tasks"])
        for t in summary["tasks"]:
            for fm, value in t["auroc"].items():
                mlflow.log_metric(f"auroc/{t['task']}/fm-{fm}", value)
        mlflow.log_text("\n".join(sorted(runs["run_id"])), "compared_runs.txt")
        mlflow.set_tag("compared.runs", str(len(runs)))
        for name, table in tables.items():
            mlflow.log_table(
                table.astype({c: str for c in table.columns if table[c].dtype == object}),
                f"tables/{name}.json",
            )
        mlflow.log_artifact(str(out / "report.html"))
        mlflow.log_artifact(str(out / "report.md"))
        mlflow.log_artifacts(str(out / "figures"), "figures")
        study_run = active.info.run_id
    for fm, tags in cmp.fm_evaluation_tags(runs, factors, eval_data).items():
        reg = json.loads(
            (settings.paths.outputs / "register" / fm / "registration.json").read_text()
        )
        for key, value in {**tags, "eval.study_run": study_run}.items():
            client.set_model_version_tag(reg["name"], reg["version"], key, value)


if __name__ == "__main__":
    typer.run(main)
