"""The study report: Markdown (for a README or a paper's supplement) and standalone HTML (every
figure embedded, no external asset, so it opens offline)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment
from tabulate import tabulate

from retfm.reporting.summary import (
    alignment_line,
    factor_lines,
    power_rows,
    summary_rows,
)

_HTML = Environment(autoescape=True).from_string("""<!doctype html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
line-height:1.45}table{border-collapse:collapse;margin:.8em 0;font-size:13px;display:block;
overflow-x:auto;max-width:100%}td,th{border:1px solid #ccc;padding:3px 7px;white-space:nowrap}
th{background:#f3f3f3}img{max-width:100%}.note{color:#444}.answer{background:#f6f8fa;
border-left:4px solid #3a7;padding:.5em 1em}</style></head>
<body><h1>{{ title }}</h1><p class="note">{{ note }}</p>
{% for s in sections %}<h2>{{ s.title }}</h2>
{% for p in s.paragraphs %}<p class="{{ s.css }}">{{ p }}</p>{% endfor %}
{% if s.table %}{{ s.table | safe }}{% endif %}
{% for img in s.images %}<img alt="{{ img.alt }}" src="data:image/png;base64,{{ img.data }}">
{% endfor %}{% endfor %}</body></html>""")

#: Display names for table columns (raw names stay in the CSV files).
COLUMN_NAMES = {
    "fm_a": "FM a",
    "fm_b": "FM b",
    "auroc_a": "AUROC a",
    "auroc_b": "AUROC b",
    "diff": "difference a - b",
    "lo": "95% CI low",
    "hi": "95% CI high",
    "p": "p",
    "p_adj": "p adjusted (deciding)",
    "verdict": "verdict",
    "detectable": "detectable difference (80% power)",
    "n_images": "test images",
    "n_patients": "patients",
    "n_seeds_a": "seeds a",
    "p_seed_ttest": "p, t-test over seeds (RETFound; not used)",
    "task_site": "data site",
    "aligned_fms": "aligned FM",
    "min_diff": "smallest advantage",
    "max_p_adj": "largest p adjusted",
    "perf_p_adj": "p adjusted: performance",
    "perf_verdict": "changes performance?",
    "gap_p_adj": "p adjusted: FM gap",
    "gap_verdict": "changes the FM gap?",
    "auroc_gap": "mean within-task AUROC gap",
    "auroc_diff": "AUROC difference vs reference",
    "reference": "reference group",
    "worst_auroc": "worst-group AUROC",
    "gap_auroc": "AUROC gap (max - min)",
    "eod": "equalised-odds difference",
    "es_auc": "equity-scaled AUROC",
    "undefined_groups": "undefined groups",
    "sd_replicates_a": "sd between runs a",
    "sd_replicates_b": "sd between runs b",
    "n_replicates_a": "runs a",
    "n_replicates_b": "runs b",
    "df": "degrees of freedom",
}
TABLE_COLUMNS = {
    "comparisons": [
        "task",
        "fm_a",
        "fm_b",
        "auroc_a",
        "auroc_b",
        "diff",
        "lo",
        "hi",
        "p",
        "p_adj",
        "verdict",
        "detectable",
        "n_replicates_a",
        "n_replicates_b",
        "sd_replicates_a",
        "sd_replicates_b",
        "df",
        "n_images",
        "n_patients",
    ],
    "run_comparisons": [
        "task",
        "fm_a",
        "fm_b",
        "auroc_a",
        "auroc_b",
        "diff",
        "lo",
        "hi",
        "p",
        "p_adj",
        "verdict",
        "n_images",
        "n_patients",
        "p_seed_ttest",
    ],
    "alignment": ["task", "task_site", "aligned_fms", "verdict", "min_diff", "max_p_adj"],
    "factors": [
        "factor",
        "n_images",
        "perf_p_adj",
        "perf_verdict",
        "gap_p_adj",
        "gap_verdict",
        "auroc_gap",
    ],
    "factor_groups": ["factor", "group", "n_images", "reference", "auroc_diff", "lo", "hi"],
    "fairness": [
        "fm",
        "task",
        "factor",
        "worst_auroc",
        "gap_auroc",
        "eod",
        "es_auc",
        "undefined_groups",
    ],
}


@dataclass
class _Section:
    title: str
    paragraphs: list[str]
    table: pd.DataFrame | None = None
    images: list[Path] = field(default_factory=list)
    css: str = "note"


def _view(name: str, table: pd.DataFrame | None) -> pd.DataFrame | None:
    if table is None or not len(table):
        return None
    cols = [c for c in TABLE_COLUMNS.get(name, list(table.columns)) if c in table.columns]
    return table[cols].rename(columns=COLUMN_NAMES)


def _methods(summary: dict[str, Any]) -> list[str]:
    m = summary["methods"]
    k = summary.get("n_replicates", 1)
    text = [
        "Whose pre-training data makes the better FM on a task (the study's question, the data "
        f"level): {m.get('data_level_test', m['comparison_test'])}. Each FM is pre-trained "
        f"{k} time(s) here, each run on its own cohort drawn from the site's pool with its own "
        "seed, so the spread between runs (another draw of the same site's data) is inside the "
        "test; with one run per site the data-level verdict is undetermined, never 'no "
        f"evidence'. p-values are adjusted ({m['correction']}) over the study's data-level "
        f"comparisons; alpha {m['alpha']}.",
        "Which pre-training run is better (per run, labelled as such; it says nothing about "
        f"the data, since another draw moves it): {m['comparison_test']}. Both runs are scored "
        "on the same test images, so the test is paired; its variance holds the test set's "
        "sampling error (patients, not images, are the independent units) and the adaptation "
        "seeds' spread. A t-test over seeds (RETFound's) sees only the seeds: every seed is "
        "scored on the same finite test set, so in simulation it called equally good FMs "
        "different far above its nominal rate; its p is shown as an extra column and decides "
        f"nothing. What the per-run test does not cover: {m['comparison_scope']}.",
        f"Which metadata factors matter: {m['factor_test']}. Each image's placement (the share "
        "of other-class images it outranks on its own class) is compared between groups only "
        "within the same task, true class and FM (its runs and seeds as one ensemble), so "
        "differences in difficulty, disease prevalence and age / sex / ethnicity mix between "
        "tasks cannot pass for a factor effect.",
        m["undetermined"] + ".",
    ]
    cal = m.get("calibration")
    if cal:
        rates = "; ".join(
            f"{k}: {v['rate']:.1%} (95% CI {v['lo']:.1%}-{v['hi']:.1%})"
            for k, v in cal["headline"].items()
        )
        ok = "within" if cal["within_target"] else "NOT within"
        draws = {t: v for t, v in (cal.get("draw_auroc_sd") or {}).items() if v is not None}
        drawn = (
            "each pre-training run's population AUROC redrawn with the between-run sd measured "
            "on this study's replicates ("
            + ", ".join(f"{t} {v:.3f}" for t, v in draws.items())
            + "), "
            if draws
            else ""
        )
        text.append(
            f"Measured at this study's design ({cal['n_studies']} simulated studies where the "
            f"sites' data are equally good and no factor has an effect: {drawn}test sets "
            "resampled from this study's own patients, its seeds, runs and class counts, "
            f"difficulty matched to its AUROCs): false-positive rates {rates}; every decision "
            f"{ok} its target (per decision: upper 95% bound at most alpha + 0.02; a per-study "
            "family rate: its interval meets [alpha/2, alpha + 0.02]). 'per-run comparison' is "
            "the per-run test's rate when draws vary: it is why that test does not answer the "
            "data question. `retfm calibrate` measures power on a grid."
        )
    detect = [
        f"{t['task']} ({t['n_test_images']} test images): {c['detectable']:.3f}"
        for t in summary["tasks"]
        for c in t["comparisons"]
        if c["detectable"] is not None
    ]
    if detect:
        text.append(
            "At this study's test-set sizes and runs per site the data-level test can detect "
            "(80% power) an AUROC difference of "
            + "; ".join(detect)
            + ". Smaller true differences will mostly read as 'no evidence'."
        )
    return text


def write_report(
    summary: dict[str, Any],
    tables: dict[str, pd.DataFrame],
    figures: dict[str, list[Path]],
    out_dir: Path,
) -> tuple[Path, Path]:
    """``tables``: comparisons (data level), run_comparisons, alignment, factors,
    factor_groups, fairness; ``figures``: alignment, differences, run_differences, factors,
    subgroups."""
    header, rows = summary_rows(summary)
    title = f"retfm study report: {summary['study']}"
    k = summary.get("n_replicates", 1)
    note = (
        f"{len(summary['fms'])} FMs x {k} pre-training run(s) each x {len(summary['tasks'])} "
        f"tasks x {summary['n_seeds']} seeds; profile {summary['profile']}; "
        f"{summary['runs_compared']} adaptation runs."
    )
    answers = [alignment_line(summary["alignment"]), *factor_lines(summary["factors"])]
    if summary.get("run_alignment"):
        answers.append(alignment_line(summary["run_alignment"], level="run"))
    p_header, p_rows = power_rows(summary)
    sections = [
        _Section("The study's answers", answers, css="answer"),
        _Section(
            "Overview: FM x task AUROC",
            [
                "data level: each FM's AUROC as the mean ± sd over its pre-training runs; the "
                "difference pooled over the runs with its 95% interval; p adjusted over the "
                "data-level comparisons"
            ],
            pd.DataFrame(rows, columns=header),
        ),
        _Section("Methods: how each question is decided", _methods(summary)),
        _Section(
            "Whose data is better on each task (data level)",
            [
                "filled: the pooled difference with its 95% interval (red: decided; black: no "
                "evidence; grey: undetermined); open circles: each pair of runs"
            ],
            _view("comparisons", tables.get("comparisons")),
            figures.get("differences", []),
        ),
        _Section(
            "Power by replicates",
            [
                "the AUROC advantage of one site's data detectable at 80% power with K "
                "pre-training runs per site, at this study's test sets and measured spread "
                "between runs; and how many runs per site an advantage needs"
            ],
            pd.DataFrame(p_rows, columns=p_header) if p_rows else None,
        ),
        _Section(
            "Which pre-training run is better (per run)",
            [
                "run r<k> of one FM against run r<k> of the other; decided per run by the "
                "paired seeded test: another draw of the cohorts moves these verdicts"
            ],
            _view("run_comparisons", tables.get("run_comparisons")),
            figures.get("run_differences", []),
        ),
        _Section(
            "Alignment: FM x data site",
            [
                "mean AUROC of each FM on each data site's tasks; "
                "per task with an aligned FM, the verdict"
            ],
            _view("alignment", tables.get("alignment")),
            figures.get("alignment", []),
        ),
        _Section(
            "Metadata factors",
            [
                "per group: AUROC difference against the factor's "
                "largest group within task, class and FM (95% interval, unadjusted); the "
                "verdicts use the adjusted p"
            ],
            _view("factors", tables.get("factors")),
            figures.get("factors", []),
        ),
        _Section(
            "Metadata factors: per group", [], _view("factor_groups", tables.get("factor_groups"))
        ),
        _Section(
            "Fairness gaps per FM, task and factor",
            ["mean over seeds; gap = max - min AUROC over defined groups"],
            _view("fairness", tables.get("fairness")),
        ),
        _Section(
            "Per-subgroup AUROC with 95% intervals",
            ["undefined groups (one class, or too few images) are shown as undefined, never as 0"],
            None,
            figures.get("subgroups", []),
        ),
    ]

    md = [f"# {title}", "", note, ""]
    html_sections = []
    for s in sections:
        md += [f"## {s.title}", "", *[f"{p}\n" for p in s.paragraphs]]
        if s.table is not None and len(s.table):
            md += [
                tabulate(
                    s.table, headers="keys", tablefmt="github", showindex=False, floatfmt=".4g"
                ),
                "",
            ]
        md += [f"![{p.stem}](figures/{p.name})" for p in s.images] + [""]
        html_sections.append(
            {
                "title": s.title,
                "paragraphs": s.paragraphs,
                "css": s.css,
                "table": None
                if s.table is None or not len(s.table)
                else s.table.to_html(
                    index=False, float_format=lambda v: f"{v:.4g}", na_rep="undefined"
                ),
                "images": [
                    {"alt": p.stem, "data": base64.b64encode(p.read_bytes()).decode()}
                    for p in s.images
                ],
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text("\n".join(md))
    html_path.write_text(_HTML.render(title=title, note=note, sections=html_sections))
    return md_path, html_path
