"""The study report: Markdown (for a README or a paper's supplement) and standalone HTML."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment
from tabulate import tabulate

from retfm.reporting.summary import summary_rows

SECTIONS = (
    (
        "alignment",
        "Alignment: FM site x data site",
        "Mean AUROC of each site's FM on each data site's tasks.",
    ),
    (
        "subgroups",
        "Per-subgroup AUROC with 95% intervals",
        "Undefined groups (one class, or too few images) are shown as undefined, never as 0.",
    ),
)

_HTML = Environment(autoescape=True).from_string("""<!doctype html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;
padding:3px 8px}th{background:#f3f3f3}img{max-width:100%}.note{color:#555}</style></head>
<body><h1>{{ title }}</h1><p class="note">{{ note }}</p>
{% for s in sections %}<h2>{{ s.title }}</h2><p class="note">{{ s.note }}</p>
{% if s.table %}{{ s.table | safe }}{% endif %}
{% for img in s.images %}<img alt="{{ img.alt }}" src="data:image/png;base64,{{ img.data }}">
{% endfor %}{% endfor %}</body></html>""")


def _md_table(frame: pd.DataFrame) -> str:
    return tabulate(frame, headers="keys", tablefmt="github", showindex=False, floatfmt=".4g")


def write_report(
    summary: dict[str, Any],
    tables: dict[str, pd.DataFrame],
    figures: dict[str, list[Path]],
    out_dir: Path,
) -> tuple[Path, Path]:
    """``tables``: significance, factors, fairness; ``figures``: alignment, subgroups."""
    header, rows = summary_rows(summary)
    overview = pd.DataFrame(rows, columns=header)
    title = f"retfm study report: {summary['study']}"
    note = (
        f"{len(summary['fms'])} FMs x {len(summary['tasks'])} tasks x {summary['n_seeds']} "
        f"seeds; profile {summary['profile']}. Aligned FM significantly better on "
        f"{summary['alignment']['n_better']} of {summary['alignment']['n_tasks']} tasks."
    )
    blocks: list[tuple[str, str, pd.DataFrame | None, list[Path]]] = [
        ("Overview: FM x task AUROC", "mean ± sd over seeds", overview, [])
    ]
    blocks.append((SECTIONS[0][1], SECTIONS[0][2], None, figures.get("alignment", [])))
    blocks.append(
        (
            "Significance (per task, adjusted over tasks)",
            "paired per-image test (DeLong / patient bootstrap) and t-test over seeds; "
            "Holm and Benjamini-Hochberg",
            tables.get("significance"),
            [],
        )
    )
    blocks.append(
        (
            "Fairness gaps per FM, task and factor",
            "mean over seeds; gap = max - min AUROC over defined groups; "
            "complete = no undefined group",
            tables.get("fairness"),
            [],
        )
    )
    blocks.append((SECTIONS[1][1], SECTIONS[1][2], None, figures.get("subgroups", [])))
    blocks.append(
        (
            "Metadata factors",
            "logistic model of per-image correctness, patient-clustered Wald tests; "
            "flagged = adjusted p < alpha",
            tables.get("factors"),
            [],
        )
    )

    md = [f"# {title}", "", note, ""]
    html_sections = []
    for heading, text, table, images in blocks:
        md += [f"## {heading}", "", text, ""]
        if table is not None and len(table):
            md += [_md_table(table), ""]
        md += [f"![{p.stem}](figures/{p.name})" for p in images] + [""]
        html_sections.append(
            {
                "title": heading,
                "note": text,
                "table": None
                if table is None or not len(table)
                else table.to_html(
                    index=False, float_format=lambda v: f"{v:.4g}", na_rep="undefined"
                ),
                "images": [
                    {"alt": p.stem, "data": base64.b64encode(p.read_bytes()).decode()}
                    for p in images
                ],
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text("\n".join(md))
    html_path.write_text(_HTML.render(title=title, note=note, sections=html_sections))
    return md_path, html_path
