"""The study's answers as one JSON-able dict (``outputs/study/summary.json``) and the table
printed at the end of ``make demo`` (``retfm summary``).

Every verdict printed here comes with the test that decided it and that test's own p-value:
never one test's p beside another test's verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np
import pandas as pd
from tabulate import tabulate

from retfm.evaluation.analysis import AnalysisConfig, StudyAnalysis
from retfm.evaluation.comparison import COMPARISON_SCOPE, DECIDING_TEST
from retfm.evaluation.factors import TEST_NAME as FACTOR_TEST
from retfm.evaluation.subgroups import group_sort_key
from retfm.evaluation.verdicts import EFFECT, NO_EVIDENCE, is_undetermined
from retfm.fms import FM

UNDETERMINED_MEANS = (
    "undetermined: the test could not be made (fewer than two seeds, zero variance, a single "
    "class, too few groups, no variation left); shown with its reason and never counted as a no"
)


def _num(value: Any, digits: int = 4) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return round(v, digits) if np.isfinite(v) else None


def _comparison(row: pd.Series) -> dict[str, Any]:
    return {
        "fm_a": row["fm_a"],
        "fm_b": row["fm_b"],
        "diff": _num(row["diff"]),
        "lo": _num(row["lo"]),
        "hi": _num(row["hi"]),
        "p": _num(row["p"], 6),
        "p_adj": _num(row["p_adj"], 6),
        "verdict": row["verdict"],
        "detectable": _num(row["detectable"]),
        "p_seed_ttest": _num(row["p_seed_ttest"], 6),
    }


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
) -> dict[str, Any]:
    """The study's answers: per task AUROCs and the FM comparison, the alignment headline, the
    factor verdicts, and the methods (tests, alpha, calibration at this design)."""
    names = [fm.name for fm in fms]
    tasks = []
    comp = analysis.comparisons
    align = analysis.alignment.set_index("task") if len(analysis.alignment) else None
    for task, frame in runs.groupby("task", sort=False):
        means = frame.groupby("fm")["auroc"].mean()
        sds = frame.groupby("fm")["auroc"].std(ddof=1).fillna(0.0)
        mine = comp[comp["task"] == task] if len(comp) else comp
        tasks.append(
            {
                "task": task,
                "task_site": str(frame["task_site"].iloc[0]),
                "n_test_images": int(mine["n_images"].max()) if len(mine) else None,
                "auroc": {fm: _num(means.get(fm)) for fm in names},
                "auroc_sd": {fm: _num(sds.get(fm)) for fm in names},
                "comparisons": [_comparison(r) for _, r in mine.iterrows()],
                "alignment": (
                    align.loc[task, "verdict"]
                    if align is not None and task in align.index
                    else None
                ),
            }
        )
    headline = dict(analysis.headline)
    metadata = {name: "age" for name in config.age_bins}
    factors = [
        _factor(r, analysis.factor_groups, metadata.get(r["factor"], r["factor"]))
        for _, r in analysis.factors.iterrows()
    ]
    return {
        "study": study,
        "profile": profile,
        "fms": names,
        "fm_info": {
            fm.name: {
                "site": fm.site,
                "recipe": fm.recipe,
                "label": fm.label,
                "source": "imported" if fm.imported else "pre-trained",
            }
            for fm in fms
        },  # fmt: skip
        "n_seeds": int(runs.groupby(["fm", "task"])["seed"].nunique().min()),
        "tasks": tasks,
        "alignment": headline,
        "factors": factors,
        "methods": {
            "alpha": config.alpha,
            "correction": config.correction,
            "comparison_test": DECIDING_TEST,
            "comparison_scope": COMPARISON_SCOPE,
            "factor_test": FACTOR_TEST,
            "undetermined": UNDETERMINED_MEANS,
            "calibration": calibration,
        },
        "runs_compared": int(len(runs)),
    }


# --------------------------------------------------------------------------- printing


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def summary_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The FM x task table: AUROCs, then each FM pair's difference, CI, adjusted p, verdict."""
    fms = summary["fms"]
    header = [
        "task",
        "data site",
        *[f"AUROC {fm}" for fm in fms],
        "difference (95% CI)",
        "p (adjusted)",
        "which FM is better",
        "aligned FM better?",
    ]
    rows = []
    for t in summary["tasks"]:
        cells = [
            "undefined"
            if t["auroc"][fm] is None
            else f"{t['auroc'][fm]:.3f} ± {t['auroc_sd'][fm]:.3f}"
            for fm in fms
        ]
        comps = t["comparisons"] or [None]
        for i, c in enumerate(comps):
            if c is None:
                diff, p, verdict = "-", "-", "-"
            else:
                label = f"{c['fm_a']} - {c['fm_b']}: " if len(comps) > 1 or len(fms) > 2 else ""
                ci = "" if c["lo"] is None else f" [{c['lo']:+.3f}, {c['hi']:+.3f}]"
                diff = f"{label}{_pct(c['diff'])}{ci}"
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


def alignment_line(al: dict[str, Any]) -> str:
    decided, better = al["n_decided"], al["n_better"]
    line = (
        f"Does alignment matter? The aligned FM is significantly better on {better} of "
        f"{decided} decided task(s) with an aligned FM"
    )
    if al["better_tasks"]:
        line += f" ({', '.join(al['better_tasks'])})"
    if al["n_worse"]:
        line += f"; significantly worse on {al['n_worse']}"
    if al["n_undetermined"]:
        reasons = "; ".join(f"{k}: {v}" for k, v in al["undetermined_tasks"].items())
        line += f"; {al['n_undetermined']} undetermined, not counted ({reasons})"
    return line + ". The published study found about one third."


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
    out.write(
        f"\nStudy {summary['study']}: AUROC mean ± sd over {summary['n_seeds']} seeds; "
        f"difference = seed-mean AUROC difference with its 95% interval; p adjusted "
        f"({m['correction']}) over every comparison.\n\n"
    )
    out.write(tabulate(rows, headers=header, tablefmt="github") + "\n\n")
    out.write(alignment_line(summary["alignment"]) + "\n")
    out.write(f"  Decided by: {m['comparison_test']}; alpha {m['alpha']}.\n")
    if m.get("comparison_scope"):  # absent from a summary.json written before it was added
        out.write(f"  Scope: {m['comparison_scope']}.\n")
    for line in factor_lines(summary["factors"]):
        out.write(line + "\n")
    header, rows = factor_table(summary["factors"])
    out.write(tabulate(rows, headers=header, tablefmt="github") + "\n")
    out.write(f"  Decided by: {m['factor_test']}.\n")
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
