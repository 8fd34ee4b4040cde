"""The study's answers as one JSON-able dict (``outputs/study/summary.json``) and the table
printed at the end of ``make demo`` (``retfm summary``).

Every verdict printed here comes with the test that decided it and that test's own p-value:
never one test's p beside another test's verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import numpy as np
import pandas as pd
from tabulate import tabulate

from retfm.evaluation.analysis import AnalysisConfig, StudyAnalysis
from retfm.evaluation.comparison import COMPARISON_SCOPE, DATA_LEVEL_TEST, DECIDING_TEST
from retfm.evaluation.factors import TEST_NAME as FACTOR_TEST
from retfm.evaluation.subgroups import group_sort_key
from retfm.evaluation.verdicts import EFFECT, NO_EVIDENCE, is_undetermined
from retfm.fms import FM

UNDETERMINED_MEANS = (
    "undetermined: the test could not be made (one pre-training run per site, fewer than two "
    "seeds, zero variance, a single class, too few groups, no variation left); shown with its "
    "reason and never counted as a no"
)


def _num(value: Any, digits: int = 4) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return round(v, digits) if np.isfinite(v) else None


def _comparison(row: pd.Series) -> dict[str, Any]:
    out = {
        "fm_a": row["fm_a"],
        "fm_b": row["fm_b"],
        "diff": _num(row["diff"]),
        "lo": _num(row["lo"]),
        "hi": _num(row["hi"]),
        "p": _num(row["p"], 6),
        "p_adj": _num(row["p_adj"], 6),
        "verdict": row["verdict"],
        "detectable": _num(row["detectable"]),
    }
    if "p_seed_ttest" in row:
        out["p_seed_ttest"] = _num(row["p_seed_ttest"], 6)
    if "replicate_aurocs_a" in row:
        out["replicate_aurocs_a"] = [_num(v) for v in row["replicate_aurocs_a"]]
        out["replicate_aurocs_b"] = [_num(v) for v in row["replicate_aurocs_b"]]
        out["sd_replicates_a"] = _num(row["sd_replicates_a"])
        out["sd_replicates_b"] = _num(row["sd_replicates_b"])
        out["var_test"] = _num(row["var_test"], 8)
        out["n_patients"] = int(row["n_patients"])
    return out


#: AUROC advantages the report says how many replicates each needs.
ADVANTAGES = (0.01, 0.02, 0.03, 0.05)
POWER_REPLICATES = (1, 2, 3, 5)


def replicate_power(comparisons: pd.DataFrame, config: AnalysisConfig) -> list[dict[str, Any]]:
    """Per data-level comparison: the AUROC advantage detectable at ``config.power`` with
    K = 1, 2, 3, 5 replicates per site, and the replicates each of :data:`ADVANTAGES` needs,
    at this study's test set (its measured common test-set error and patients) and replicate
    spread (the measured sd of the replicates' AUROCs; none with one run per site). Level:
    alpha / family size (Holm's strictest step)."""
    from retfm.evaluation.statistics import replicates_needed, replicates_power

    rows = []
    level = config.alpha / max(len(comparisons), 1)
    for r in comparisons.itertuples():
        sd_a, sd_b = (
            float(getattr(r, "sd_replicates_a", np.nan)),
            float(getattr(r, "sd_replicates_b", np.nan)),
        )
        var_test = float(getattr(r, "var_test", np.nan))
        if not (np.isfinite(sd_a) and np.isfinite(sd_b) and np.isfinite(var_test)):
            continue
        n_pat = int(r.n_patients)
        detect = replicates_power(sd_a, sd_b, var_test, n_pat, level, config.power,
                                  POWER_REPLICATES)  # fmt: skip
        rows.append(
            {
                "task": r.task,
                "fm_a": r.fm_a,
                "fm_b": r.fm_b,
                "spread": "measured",
                "sd_replicates": _num(np.sqrt((sd_a**2 + sd_b**2) / 2)),
                "detectable": {str(k): _num(v) for k, v in detect.items()},
                "replicates_needed": {
                    str(a): replicates_needed(
                        a, sd_a, sd_b, var_test, n_pat, level, config.power
                    )  # fmt: skip
                    for a in ADVANTAGES
                },
            }
        )
    return rows


def _factor(row: pd.Series, groups: pd.DataFrame, metadata: str) -> dict[str, Any]:
    mine = groups[(groups["factor"] == row["factor"]) & ~groups["reference"].astype(bool)]
    worst = mine.assign(size=mine["auroc_diff"].abs()).sort_values("size", ascending=False).head(1)
    ref = groups[(groups["factor"] == row["factor"]) & groups["reference"].astype(bool)]
    effect = None
    if len(worst) and np.isfinite(worst["auroc_diff"].iloc[0]):
        effect = {
            "group": str(worst["group"].iloc[0]),
            "reference": str(ref["group"].iloc[0]) if len(ref) else None,
            "auroc_diff": _num(worst["auroc_diff"].iloc[0]),
            "lo": _num(worst["lo"].iloc[0]),
            "hi": _num(worst["hi"].iloc[0]),
        }
    return {
        "factor": row["factor"],
        "metadata": metadata,
        "groups": [str(g) for g in row.get("groups", [])],
        "verdict": row["perf_verdict"],
        "p_adj": _num(row["perf_p_adj"], 6),
        "gap_verdict": row["gap_verdict"],
        "gap_p_adj": _num(row["gap_p_adj"], 6),
        "largest_effect": effect,
        "auroc_gap": _num(row["auroc_gap"]),
    }


def build_summary(
    *,
    study: str,
    profile: str,
    fms: Sequence[FM],
    runs: pd.DataFrame,
    analysis: StudyAnalysis,
    config: AnalysisConfig,
    calibration: dict[str, Any] | None = None,
    replicates: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The study's answers: per task AUROCs and the data-level FM comparison (each FM's
    pre-training runs pooled), the per-run comparisons (labelled), the alignment headline, the
    factor verdicts, power by replicates, and the methods (tests, alpha, calibration at this
    design). ``replicates``: FM -> its runs (default: one run per FM, named as the FM)."""
    names = [fm.name for fm in fms]
    replicates = {k: list(v) for k, v in (replicates or {n: [n] for n in names}).items()}
    tasks = []
    comp, run_comp = analysis.comparisons, analysis.run_comparisons
    align = analysis.alignment.set_index("task") if len(analysis.alignment) else None
    run_align = analysis.run_alignment.set_index("task") if len(analysis.run_alignment) else None
    run_col = "run" if "run" in runs.columns else "fm"
    for task, frame in runs.groupby("task", sort=False):
        per_run = frame.groupby(run_col)["auroc"].mean()
        fm_of_run = frame.groupby(run_col)["fm"].first()
        means = per_run.groupby(fm_of_run).mean()
        sds = per_run.groupby(fm_of_run).std(ddof=1)
        seed_sds = frame.groupby(run_col)["auroc"].std(ddof=1).fillna(0.0)
        mine = comp[comp["task"] == task] if len(comp) else comp
        mine_runs = run_comp[run_comp["task"] == task] if len(run_comp) else run_comp
        tasks.append(
            {
                "task": task,
                "task_site": str(frame["task_site"].iloc[0]),
                "n_test_images": int(mine["n_images"].max()) if len(mine) else None,
                "auroc": {fm: _num(means.get(fm)) for fm in names},
                "auroc_sd_replicates": {fm: _num(sds.get(fm)) for fm in names},
                "run_auroc": {str(r): _num(v) for r, v in per_run.items()},
                "run_auroc_sd_seeds": {str(r): _num(v) for r, v in seed_sds.items()},
                "comparisons": [_comparison(r) for _, r in mine.iterrows()],
                "run_comparisons": [_comparison(r) for _, r in mine_runs.iterrows()],
                "alignment": _lookup(align, task),
                "run_alignment": _lookup(run_align, task),
            }
        )
    metadata = {name: "age" for name in config.age_bins}
    factors = [
        _factor(r, analysis.factor_groups, metadata.get(r["factor"], r["factor"]))
        for _, r in analysis.factors.iterrows()
    ]
    k = min((len(v) for v in replicates.values()), default=1)
    return {
        "study": study,
        "profile": profile,
        "fms": names,
        "replicates": replicates,
        "n_replicates": k,
        "fm_info": {
            fm.name: {
                "site": fm.site,
                "recipe": fm.recipe,
                "label": fm.label,
                "source": "imported" if fm.imported else "pre-trained",
            }
            for fm in fms
        },  # fmt: skip
        "n_seeds": int(runs.groupby([run_col, "task"])["seed"].nunique().min()),
        "tasks": tasks,
        "alignment": dict(analysis.headline),
        "run_alignment": dict(analysis.run_headline),
        "power_by_replicates": replicate_power(comp, config) if len(comp) else [],
        "factors": factors,
        "methods": {
            "alpha": config.alpha,
            "correction": config.correction,
            "data_level_test": DATA_LEVEL_TEST,
            "comparison_test": DECIDING_TEST,
            "comparison_scope": COMPARISON_SCOPE,
            "factor_test": FACTOR_TEST,
            "undetermined": UNDETERMINED_MEANS,
            "calibration": calibration,
        },
        "runs_compared": int(len(runs)),
    }


def _lookup(table: pd.DataFrame | None, task: str) -> str | None:
    return str(table.loc[task, "verdict"]) if table is not None and task in table.index else None


# --------------------------------------------------------------------------- printing


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def _sd(value: float | None) -> str:
    return "" if value is None else f" ± {value:.3f}"


def _diff_cell(c: dict[str, Any], label: str = "") -> str:
    ci = "" if c["lo"] is None else f" [{c['lo']:+.3f}, {c['hi']:+.3f}]"
    return f"{label}{_pct(c['diff'])}{ci}"


def summary_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The data-level table: per task each FM's AUROC (mean over its pre-training runs ± their
    sd), then each FM pair's pooled difference, CI, adjusted p and verdict."""
    fms = summary["fms"]
    k = summary.get("n_replicates", 1)
    header = [
        "task",
        "data site",
        *[f"AUROC {fm}" for fm in fms],
        "difference (95% CI)",
        "p (adjusted)",
        "whose data is better" if k > 1 else "whose data is better (needs >= 2 runs per site)",
        "aligned FM better?",
    ]
    rows = []
    for t in summary["tasks"]:
        sds = t.get("auroc_sd_replicates", t.get("auroc_sd", {}))
        cells = [
            "undefined" if t["auroc"][fm] is None else f"{t['auroc'][fm]:.3f}{_sd(sds.get(fm))}"
            for fm in fms
        ]
        comps = t["comparisons"] or [None]
        for i, c in enumerate(comps):
            if c is None:
                diff, p, verdict = "-", "-", "-"
            else:
                label = f"{c['fm_a']} - {c['fm_b']}: " if len(comps) > 1 or len(fms) > 2 else ""
                diff = _diff_cell(c, label)
                p = "-" if c["p_adj"] is None else f"{c['p_adj']:.3g}"
                verdict = c["verdict"]
            first = i == 0
            rows.append(
                [
                    t["task"] if first else "",
                    t["task_site"] if first else "",
                    *(cells if first else [""] * len(cells)),
                    diff,
                    p,
                    verdict,
                    (t["alignment"] or "- (no aligned FM)") if first else "",
                ]
            )
    return header, rows


def run_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The per-run table: each pair of pre-training runs (same replicate index, different FMs)
    on each task, decided by the paired seeded test."""
    header = ["task", "runs a - b", "AUROC a", "AUROC b", "difference (95% CI)",
              "p (adjusted)", "which run is better"]  # fmt: skip
    rows = []
    for t in summary["tasks"]:
        aurocs = t.get("run_auroc", {})
        for i, c in enumerate(t.get("run_comparisons", [])):
            rows.append(
                [
                    t["task"] if i == 0 else "",
                    f"{c['fm_a']} - {c['fm_b']}",
                    _auc(aurocs.get(c["fm_a"])),
                    _auc(aurocs.get(c["fm_b"])),
                    _diff_cell(c),
                    "-" if c["p_adj"] is None else f"{c['p_adj']:.3g}",
                    c["verdict"],
                ]
            )
    return header, rows


def _auc(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def power_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Power by replicates: the detectable AUROC advantage with K runs per site, and the runs
    an advantage needs."""
    header = ["task", "FMs", "sd between runs",
              *[f"detectable, K={k}" for k in POWER_REPLICATES],
              *[f"K for +{a:.2f}" for a in ADVANTAGES]]  # fmt: skip
    rows = []
    for r in summary.get("power_by_replicates", []):
        det = [
            "undetermined" if r["detectable"][str(k)] is None else f"{r['detectable'][str(k)]:.3f}"
            for k in POWER_REPLICATES
        ]
        need = [
            "> 100"
            if r["replicates_needed"][str(a)] is None
            else str(r["replicates_needed"][str(a)])
            for a in ADVANTAGES
        ]
        sd = "-" if r["sd_replicates"] is None else f"{r['sd_replicates']:.3f} ({r['spread']})"
        rows.append([r["task"], f"{r['fm_a']} vs {r['fm_b']}", sd, *det, *need])
    return header, rows


def alignment_line(al: dict[str, Any], *, level: str = "data") -> str:
    """The alignment headline; ``level`` "data" (runs pooled: whose data is better) or "run"
    (per pre-training run, labelled: it says nothing about the data)."""
    decided, better = al["n_decided"], al["n_better"]
    if level == "data":
        line = (
            "Does aligned pre-training data help? The aligned site's FM (its pre-training runs "
            f"pooled) is significantly better on {better} of {decided} decided task(s) with an "
            "aligned FM"
        )
    else:
        line = (
            "Per pre-training run (not a verdict about the data): the aligned run is "
            f"significantly better on {better} of {decided} decided task(s)"
        )
    if al["better_tasks"]:
        line += f" ({', '.join(al['better_tasks'])})"
    if al["n_worse"]:
        line += f"; significantly worse on {al['n_worse']}"
    if al["n_undetermined"]:
        reasons = "; ".join(f"{k}: {v}" for k, v in al["undetermined_tasks"].items())
        line += f"; {al['n_undetermined']} undetermined, not counted ({reasons})"
    return line + (". The published study found about one third." if level == "data" else ".")


def _binning(f: dict[str, Any]) -> str:
    groups = sorted(f.get("groups") or [], key=group_sort_key)
    return f"{f['factor']} ({' / '.join(groups)})" if groups else f["factor"]


def _effect(f: dict[str, Any]) -> str:
    e = f["largest_effect"]
    if not e:
        return "-"
    return (
        f"{e['group']} vs {e['reference']}: {e['auroc_diff']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]"
    )


def factor_verdicts(factors: list[dict[str, Any]]) -> dict[str, str]:
    """One verdict per metadata factor (age, sex, ...) over its groupings: ``effect`` when any
    grouping has one, undetermined when every grouping is, else ``no evidence``."""
    out: dict[str, list[str]] = {}
    for f in factors:
        out.setdefault(f.get("metadata", f["factor"]), []).append(f["verdict"])
    return {
        k: EFFECT if EFFECT in v else (v[0] if all(map(is_undetermined, v)) else NO_EVIDENCE)
        for k, v in out.items()
    }


def factor_table(factors: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "factor",
        "grouping",
        "changes performance?",
        "largest AUROC difference vs reference (95% CI)",
        "p (adjusted)",
        "changes the FM gap?",
    ]
    rows = [
        [
            f.get("metadata", f["factor"]),
            _binning(f),
            f["verdict"],
            _effect(f),
            "-" if f["p_adj"] is None else f"{f['p_adj']:.3g}",
            f["gap_verdict"],
        ]
        for f in factors
    ]
    return header, rows


def factor_lines(factors: list[dict[str, Any]]) -> list[str]:
    verdicts = factor_verdicts(factors)
    flagged = [k for k, v in verdicts.items() if v == EFFECT]
    others = [k for k, v in verdicts.items() if v == NO_EVIDENCE]
    unsure = [f"{k} ({v})" for k, v in verdicts.items() if is_undetermined(v)]
    head = ", ".join(flagged) if flagged else "none flagged"
    line = f"Which metadata factors change performance? {head}"
    line += f"; no evidence for {', '.join(others)}" if others else ""
    line += f"; undetermined: {'; '.join(unsure)}" if unsure else ""
    return [line + "."]


def print_summary(summary: dict[str, Any], out: TextIO) -> None:
    header, rows = summary_rows(summary)
    m = summary["methods"]
    k = summary.get("n_replicates", 1)
    out.write(
        f"\nStudy {summary['study']}: {k} pre-training run(s) per FM x {summary['n_seeds']} "
        "seeds. Data level: AUROC mean ± sd over each FM's runs; difference = pooled over the "
        f"runs with its 95% interval; p adjusted ({m['correction']}) over the data-level "
        "comparisons.\n\n"
    )
    out.write(tabulate(rows, headers=header, tablefmt="github") + "\n\n")
    out.write(alignment_line(summary["alignment"]) + "\n")
    if m.get("data_level_test"):
        out.write(f"  Decided by: {m['data_level_test']}; alpha {m['alpha']}.\n")
    header, rows = run_rows(summary)
    if rows:
        out.write(
            "\nPer pre-training run (which run is better; another draw moves these, so they "
            "do not say whose data is better):\n"
        )
        out.write(tabulate(rows, headers=header, tablefmt="github") + "\n")
        if summary.get("run_alignment"):
            out.write(alignment_line(summary["run_alignment"], level="run") + "\n")
        out.write(f"  Decided by: {m['comparison_test']}.\n")
    header, rows = power_rows(summary)
    if rows:
        out.write("\nPower by replicates (80% power, at this study's test sets):\n")
        out.write(tabulate(rows, headers=header, tablefmt="github") + "\n")
    out.write("\n")
    for line in factor_lines(summary["factors"]):
        out.write(line + "\n")
    header, rows = factor_table(summary["factors"])
    out.write(tabulate(rows, headers=header, tablefmt="github") + "\n")
    out.write(f"  Decided by: {m['factor_test']} (each FM's runs and seeds as one ensemble).\n")
    cal = m.get("calibration")
    if cal:
        out.write(
            f"Calibration at this study's design ({cal['n_studies']} simulated null studies): "
            + "; ".join(
                f"{k} {v['rate']:.1%} (95% CI up to {v['hi']:.1%})"
                for k, v in cal["headline"].items()
            )
            + ".\n"
        )
    if summary.get("report"):
        out.write(f"Report: {summary['report']}\n")
