"""Figures people would rather look at than read. Matplotlib with the Agg backend (no screen)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from retfm.evaluation.verdicts import EFFECT  # noqa: E402


def _save(fig: plt.Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_loss(history_csv: Path, out: Path, *, title: str) -> Path:
    """Training loss (and learning rate) against optimizer step."""
    hist = pd.read_csv(history_csv)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(hist["step"], hist["loss"], lw=1.2, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MAE reconstruction loss")
    ax.set_title(title)
    if "lr" in hist:
        lr_ax = ax.twinx()
        lr_ax.plot(hist["step"], hist["lr"], color="tab:orange", lw=0.8, alpha=0.7)
        lr_ax.set_ylabel("learning rate", color="tab:orange")
    return _save(fig, out)


def plot_heatmap(
    matrix: pd.DataFrame,
    out: Path,
    *,
    title: str,
    label: str,
    aligned: set[tuple[str, str]] | None = None,
) -> Path:
    """A labelled heatmap, e.g. FM (rows) x data site (columns) mean AUROC; the ``aligned``
    (row, column) cells (an FM on its own site's data) are outlined and marked."""
    fig, ax = plt.subplots(figsize=(2.4 + 1.3 * matrix.shape[1], 1.4 + 0.8 * matrix.shape[0]))
    values = matrix.to_numpy(dtype=float)
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns], rotation=30)
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index])
    ax.set_xlabel(str(matrix.columns.name or "data"))
    ax.set_ylabel(str(matrix.index.name or "FM"))
    cells = aligned or set()
    for (i, j), v in np.ndenumerate(values):
        own = (str(matrix.index[i]), str(matrix.columns[j])) in cells
        if np.isfinite(v):
            text = f"{v:.3f}" + ("\naligned" if own else "")
            ax.text(j, i, text, ha="center", va="center", color="white", fontsize=9,
                    fontweight="bold" if own else "normal")  # fmt: skip
        if own:
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="white", lw=3))
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title + ("\n(outlined: the FM on its own site's data)" if cells else ""),
                 fontsize=10)  # fmt: skip
    return _save(fig, out)


def plot_subgroups(table: pd.DataFrame, out: Path, *, title: str) -> Path:
    """Per-subgroup AUROC with intervals, one marker per FM; undefined groups are marked.

    ``table`` columns: fm, group, estimate, lo, hi, defined, and optionally n (the group's
    test images, shown beside its name). The legend sits outside the axes, never on an
    interval.
    """
    groups = list(dict.fromkeys(table["group"]))
    fms = list(dict.fromkeys(table["fm"]))
    sizes = table.groupby("group", sort=False)["n"].max() if "n" in table else None
    fig, ax = plt.subplots(figsize=(8.5, 0.8 + 0.42 * len(groups) * max(1, len(fms)) ** 0.5))
    offsets = np.linspace(-0.15, 0.15, len(fms)) if len(fms) > 1 else [0.0]
    for off, fm in zip(offsets, fms, strict=True):
        sub = table[table["fm"] == fm].set_index("group").reindex(groups)
        y = np.arange(len(groups)) + off
        ok = sub["defined"].fillna(False).to_numpy(bool)
        est = sub["estimate"].to_numpy(float)
        err = np.vstack([est - sub["lo"].to_numpy(float), sub["hi"].to_numpy(float) - est])
        ax.errorbar(est[ok], y[ok], xerr=np.abs(err[:, ok]), fmt="o", capsize=3, label=f"FM {fm}")
        for yy in y[~ok]:
            ax.text(0.5, yy, "undefined", va="center", fontsize=8, color="grey")
    labels = [f"{g} (n={int(sizes[g])})" if sizes is not None else g for g in groups]
    ax.set_yticks(range(len(groups)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0.3, 1.0)
    ax.axvline(0.5, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("AUROC (95% interval; n = test images in the group)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, out)


def plot_differences(
    comparisons: pd.DataFrame,
    out: Path,
    *,
    title: str,
    xlabel: str = "AUROC difference (seed means), 95% interval",
) -> Path:
    """Each FM pair's AUROC difference per task with its 95% interval, coloured by verdict;
    with the data-level table (``replicate_aurocs_a`` / ``_b`` columns), each pre-training run
    pair's own difference (replicate k of a minus replicate k of b) as a small open marker
    beside the pooled estimate.

    ``comparisons`` columns: task, fm_a, fm_b, diff, lo, hi, verdict.
    """
    rows = comparisons.reset_index(drop=True)
    labels = [f"{r.task}: {r.fm_a} - {r.fm_b}" for r in rows.itertuples()]
    # the y labels take their width from the figure: widen it with them, so that the axis
    # keeps room for readable ticks (a fixed 7 in squeezed "-0.050 -0.025 ..." together)
    width = 5.5 + 0.075 * max((len(label) for label in labels), default=0)
    fig, ax = plt.subplots(figsize=(width, 0.9 + 0.5 * len(rows)))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    for i, r in rows.iterrows():
        decided = str(r["verdict"]).endswith("better")
        colour = "tab:red" if decided else ("tab:grey" if "undetermined" in r["verdict"] else "k")
        if np.isfinite(r["lo"]):
            ax.errorbar(
                r["diff"],
                i,
                xerr=[[r["diff"] - r["lo"]], [r["hi"] - r["diff"]]],
                fmt="o",
                color=colour,
                capsize=3,
            )
        runs_a, runs_b = r.get("replicate_aurocs_a"), r.get("replicate_aurocs_b")
        if runs_a is not None and runs_b is not None and len(runs_a) > 1:
            pairs = np.asarray(runs_a[: len(runs_b)], float) - np.asarray(runs_b[: len(runs_a)])
            label = "one pre-training run pair" if i == 0 else None
            ax.plot(pairs, np.full(len(pairs), i + 0.22), "o", mfc="none", color=colour,
                    ms=4, alpha=0.8, label=label)  # fmt: skip
        ax.text(
            1.02,
            i,
            str(r["verdict"]),
            transform=ax.get_yaxis_transform(),
            va="center",
            fontsize=8,
            color=colour,
        )
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if ax.get_legend_handles_labels()[0]:  # say what the open markers are under the title
        title += "\nfilled: runs pooled, 95% interval; open: each pair of runs r<k> - r<k>"
        ax.set_title(title, fontsize=10)
    else:
        ax.set_title(title)
    return _save(fig, out)


def plot_factor_effects(groups: pd.DataFrame, factors: pd.DataFrame, out: Path) -> Path:
    """Each group's placement (cross-group AUROC) difference against its factor's reference
    group, within task x class x FM, with 95% intervals; the factor's verdict in the label."""
    from retfm.evaluation.subgroups import group_sort_key

    verdicts = dict(zip(factors["factor"], factors["perf_verdict"], strict=True))
    order = {f: i for i, f in enumerate(dict.fromkeys(groups["factor"]))}
    rows = groups.assign(
        _f=groups["factor"].map(order), _g=groups["group"].astype(str).map(group_sort_key)
    )
    rows = rows.sort_values(["_f", "_g"]).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * len(rows)))
    labels = []
    for i, r in rows.iterrows():
        flagged = verdicts.get(r["factor"]) == EFFECT
        if r["reference"]:
            ax.plot([0], [i], marker="|", color="grey", ms=10)
        elif np.isfinite(r["lo"]):
            ax.errorbar(
                r["auroc_diff"],
                i,
                xerr=[[r["auroc_diff"] - r["lo"]], [r["hi"] - r["auroc_diff"]]],
                fmt="o",
                color="tab:red" if flagged else "k",
                capsize=3,
            )
        ref = " (reference)" if r["reference"] else ""
        labels.append(f"{r['factor']} {r['group']}{ref}  n={r['n_images']}")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("AUROC difference vs the reference group\n(within task, true class and FM)")
    ax.set_title("Metadata factors (red: the grouping is flagged)")
    return _save(fig, out)
