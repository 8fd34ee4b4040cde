"""Figures people would rather look at than read. Matplotlib with the Agg backend (no screen)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


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


def plot_heatmap(matrix: pd.DataFrame, out: Path, *, title: str, label: str) -> Path:
    """A labelled heatmap, e.g. FM site (rows) x data site (columns) mean AUROC."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * matrix.shape[1], 1.2 + 0.9 * matrix.shape[0]))
    values = matrix.to_numpy(dtype=float)
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns], rotation=30)
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index])
    ax.set_xlabel(str(matrix.columns.name or "data"))
    ax.set_ylabel(str(matrix.index.name or "FM"))
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white", fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)
    return _save(fig, out)


def plot_subgroups(table: pd.DataFrame, out: Path, *, title: str) -> Path:
    """Per-subgroup AUROC with intervals, one marker per FM; undefined groups are marked.

    ``table`` columns: fm, group, estimate, lo, hi, defined.
    """
    groups = list(dict.fromkeys(table["group"]))
    fms = list(dict.fromkeys(table["fm"]))
    fig, ax = plt.subplots(figsize=(6.5, 0.5 + 0.45 * len(groups) * max(1, len(fms)) ** 0.5))
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
    ax.set_yticks(range(len(groups)), groups)
    ax.set_xlim(0.3, 1.0)
    ax.axvline(0.5, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("AUROC (95% interval)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out)
