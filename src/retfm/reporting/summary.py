"""The study summary table printed at the end of ``make demo`` (``retfm summary``)."""

from __future__ import annotations

from typing import Any, TextIO

from tabulate import tabulate


def summary_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    fms = summary["fms"]
    header = [
        "task",
        "data site",
        *[f"AUROC fm-{fm}" for fm in fms],
        "better FM",
        "aligned FM",
        "aligned better?",
        "p (Holm)",
    ]
    rows = []
    for t in summary["tasks"]:
        cells = [f"{t['auroc'][fm]:.3f} ± {t['auroc_sd'][fm]:.3f}" for fm in fms]
        aligned = t.get("aligned_fm") or "-"
        verdict = "-" if aligned == "-" else ("yes" if t["better_fm"] == aligned else "no")
        if aligned != "-" and t["significant"]:
            verdict += " (significant)"
        p = t.get("p_holm")
        rows.append(
            [
                t["task"],
                t["task_site"],
                *cells,
                t["better_fm"],
                aligned,
                verdict,
                "-" if p is None else f"{p:.3g}",
            ]
        )
    return header, rows


def print_summary(summary: dict[str, Any], out: TextIO) -> None:
    header, rows = summary_rows(summary)
    out.write(
        f"\nStudy {summary['study']}: FM x task AUROC (mean ± sd over "
        f"{summary['n_seeds']} seeds; p: paired per-image test, Holm-adjusted)\n\n"
    )
    out.write(tabulate(rows, headers=header, tablefmt="github") + "\n")
    al = summary["alignment"]
    out.write(
        f"\nAligned FM significantly better on {al['n_better']} of {al['n_tasks']} tasks "
        f"with an aligned FM (the study found about one third).\n"
    )
    flagged = [f["factor"] for f in summary["factors"] if f["flagged"]]
    out.write(
        "Metadata factors that change performance: "
        f"{', '.join(flagged) if flagged else 'none flagged'}\n"
    )
    out.write(f"Report: {summary['report']}\n")
