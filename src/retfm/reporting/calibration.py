"""``retfm calibrate``'s printout: each decision's false-positive rate under a realistic null
with its 95% interval and the target, then power on a grid."""

from __future__ import annotations

from typing import Any

import pandas as pd
from tabulate import tabulate


def _rate(r: dict[str, Any]) -> str:
    return f"{r['rate']:.1%} [{r['lo']:.1%}, {r['hi']:.1%}] ({r['k']}/{r['n']})"


def format_calibration(report: dict[str, Any]) -> str:
    null = report["null"]
    design = null["design"]
    tasks = ", ".join(
        f"{t['task']} ({t['test_images']} test images, {t['classes']} classes)"
        for t in design["tasks"]
    )
    lines = [
        f"False-positive rates under the null: {null['n_studies']} simulated studies, "
        f"{len(design['fms'])} FMs, {design['seeds']} seeds, tasks {tasks}.",
        f"Target: upper end of the 95% interval at most {null['target_upper']:.2f} "
        f"(alpha {null['alpha']} + 0.02) for each decision: "
        + ", ".join(null.get("judged", []))
        + ". The family-wise rate (any factor flagged) is held to alpha by the Holm adjustment.",
        "",
    ]
    rows = [[k, _rate(v)] for k, v in null["rates"].items()]
    lines.append(tabulate(rows, headers=["decision", "rate [95% CI]"], tablefmt="github"))
    for size, res in report.get("null_by_test_size", {}).items():
        head = res["headline"]
        where = f"at {size} test images per task" if size.isdigit() else f"with {size}"
        lines.append(
            f"\n{where} ({res['n_studies']} studies): "
            + "; ".join(f"{k} {_rate(v)}" for k, v in head.items())
        )
    if report.get("single_draw"):
        rows = [
            [
                f"{r['draw_auroc_sd']:.3f}",
                f"{r['task_rate']:.1%} [{r['task_lo']:.1%}, {r['task_hi']:.1%}]",
                f"{r['study_rate']:.1%} [{r['study_lo']:.1%}, {r['study_hi']:.1%}]",
            ]
            for r in report["single_draw"]
        ]
        lines += [
            "",
            "One pre-training run per site (the per-run test), sites' data equally good, draws "
            "varying: P(aligned FM called better)",
            tabulate(
                rows,
                headers=["draw sd (AUROC)", "per task [95% CI]", "any task, per study"],
                tablefmt="github",
            ),
        ]
    if report.get("power_by_replicates"):
        table = pd.DataFrame(report["power_by_replicates"]).pivot(
            index="auroc_difference", columns="replicates", values="rate"
        )
        lines += [
            "",
            "Power at the data level: P(aligned FM called better) on a task, by population "
            "AUROC advantage of the aligned site's data (rows) and pre-training runs per site "
            "(columns), at the design's draw variance:",
            tabulate(table.map(lambda v: f"{v:.0%}"), headers="keys", tablefmt="github"),
        ]
    if "alignment_power" in report:
        table = pd.DataFrame(report["alignment_power"]).pivot(
            index="auroc_difference", columns="test_images", values="rate"
        )
        lines += [
            "",
            "Power: P(aligned FM called better) on a task, by population AUROC difference "
            "(rows) and test images per task (columns), at the design's runs per site:",
            tabulate(table.map(lambda v: f"{v:.0%}"), headers="keys", tablefmt="github"),
        ]
    if "factor_power" in report:
        f = pd.DataFrame(report["factor_power"])
        f["age effect (AUROC gap <60 vs >=60)"] = [
            f"{e} ({g:.3f})" for e, g in zip(f["age_effect"], f["auroc_gap"], strict=True)
        ]
        table = f.pivot(
            index="age effect (AUROC gap <60 vs >=60)", columns="test_images", values="age_flagged"
        )
        lines += [
            "",
            "Power: P(age flagged) by planted age effect (rows) and test images per task:",
            tabulate(table.map(lambda v: f"{v:.0%}"), headers="keys", tablefmt="github"),
            "with the age effect planted, sex flagged in "
            f"{f['sex_flagged'].mean():.1%} and ethnicity in {f['ethnicity_flagged'].mean():.1%}"
            " of studies (nominal: at most alpha).",
        ]
    verdict = "within target" if report["within_target"] else "NOT within target"
    lines += ["", f"Every null rate: {verdict}."]
    return "\n".join(lines)
