"""Benchmark: retfm's vectorised bootstrap vs fairlearn's MetricFrame bootstrap.

Same data in one run: 100,000 binary predictions, 1,000 resamples, three factors (age band,
sex, ethnicity). fairlearn resamples rows, so the agreement check resamples images in both
(``cluster=None``); the patient-clustered run is timed as well. Writes
``benchmarks/results/bench_bootstrap.json``.

Agreement: each percentile endpoint from B replicates carries Monte Carlo error
SE ~= sqrt(q(1-q)/B) / f(x_q), about 0.085 sigma for q = 0.025 and B = 1000 (sigma: the
bootstrap SD, (hi - lo) / 3.92), so two independent runs differ by SE_diff ~= 0.12 sigma. An
endpoint agrees when |diff| <= 4 SE_diff.

    python benchmarks/bench_bootstrap.py [--n 100000] [--n-boot 1000] [--fairlearn-boot 1000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from scipy import stats
from sklearn.metrics import roc_auc_score

from retfm.evaluation.bootstrap import bootstrap_intervals
from retfm.evaluation.subgroups import add_groups, group_column

FACTORS = ["age_fine", "sex", "ethnicity"]
ETHNICITY = ["white", "black", "south_asian", "east_asian", "mixed"]


def make_predictions(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_patients = n // 2  # two images per patient on average
    pid = np.sort(rng.integers(0, n_patients, n))
    age = rng.uniform(18, 95, n_patients)[pid]
    sex = rng.choice(["F", "M"], n_patients)[pid]
    eth = rng.choice(ETHNICITY, n_patients, p=[0.4, 0.15, 0.15, 0.2, 0.1])[pid]
    y = (rng.random(n) < 0.3).astype(int)
    signal = 1.6 - 0.8 * (age >= 60)  # age hides disease signs, as in the study
    p1 = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1.5, n) - 0.5)))
    frame = pd.DataFrame(
        {"image_id": np.arange(n).astype(str), "patient_id": pid.astype(str), "y_true": y,
         "prob_0": 1 - p1, "prob_1": p1, "age": age, "sex": sex, "ethnicity": eth}
    )  # fmt: skip
    return add_groups(frame, {"age_fine": [40.0, 60.0, 80.0]})


def fairlearn_intervals(preds: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    rows = []
    for i, factor in enumerate(FACTORS):
        frame = MetricFrame(
            metrics=roc_auc_score,
            y_true=preds["y_true"].to_numpy(),
            y_pred=preds["prob_1"].to_numpy(),
            sensitive_features=preds[group_column(factor)].rename(factor),
            n_boot=n_boot,
            ci_quantiles=[0.025, 0.975],
            random_state=seed + i,
        )
        if i == 0:
            lo, hi = frame.overall_ci
            rows.append(("overall", "all", frame.overall, float(lo), float(hi)))
        lo, hi = frame.by_group_ci
        for group, est in frame.by_group.items():
            rows.append((factor, str(group), float(est), float(lo[group]), float(hi[group])))
    return pd.DataFrame(rows, columns=["factor", "group", "estimate", "lo", "hi"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--fairlearn-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_bootstrap.json"))
    args = parser.parse_args()
    preds = make_predictions(args.n)

    t0 = time.perf_counter()
    ours = bootstrap_intervals(preds, FACTORS, n_boot=args.n_boot, seed=0, cluster=None)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    bootstrap_intervals(preds, FACTORS, n_boot=args.n_boot, seed=0, cluster="patient_id")
    t_clustered = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = fairlearn_intervals(preds, args.fairlearn_boot, seed=1)
    t_fairlearn = time.perf_counter() - t0
    # Scale fairlearn's time to the same number of resamples when fewer were run.
    t_fairlearn_equiv = t_fairlearn * args.n_boot / args.fairlearn_boot

    ours = ours[ours["metric"] == "auroc"].drop(columns="metric")
    both = ours.merge(theirs, on=["factor", "group"], suffixes=("", "_fairlearn"))
    q = 0.025
    se_endpoint = np.sqrt(q * (1 - q)) / stats.norm.pdf(stats.norm.ppf(q))
    se_diff = se_endpoint * np.sqrt(1 / args.n_boot + 1 / args.fairlearn_boot)
    sigma = (both["hi"] - both["lo"]) / (2 * stats.norm.ppf(1 - q))
    both["tolerance"] = 4 * se_diff * sigma
    both["diff_lo"] = (both["lo"] - both["lo_fairlearn"]).abs()
    both["diff_hi"] = (both["hi"] - both["hi_fairlearn"]).abs()
    both["agree"] = both[["diff_lo", "diff_hi"]].max(axis=1) <= both["tolerance"]
    est_diff = float((both["estimate"] - both["estimate_fairlearn"]).abs().max())

    cols = ["factor", "group", "n", "estimate", "lo", "lo_fairlearn", "hi", "hi_fairlearn",
            "tolerance", "agree"]  # fmt: skip
    print(both[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    speedup = t_fairlearn_equiv / t_ours
    print(f"\nn={args.n} images, {args.n_boot} resamples, factors {FACTORS}")
    print(f"retfm (image resampling)      {t_ours:8.2f} s")
    print(f"retfm (patient resampling)    {t_clustered:8.2f} s")
    print(f"fairlearn MetricFrame x3      {t_fairlearn:8.2f} s ({args.fairlearn_boot} resamples)")
    print(f"speed-up                      {speedup:8.1f} x  (target >= 20 x)")
    max_diff = both[["diff_lo", "diff_hi"]].to_numpy().max()
    print(
        f"max |endpoint diff|           {max_diff:.4f}  (per-row tolerance 4 x MC SE, median "
        f"{both['tolerance'].median():.4f}); all agree: {bool(both['agree'].all())}"
    )
    print(f"max |estimate diff|           {est_diff:.2e}")
    result = {
        "n": args.n,
        "n_boot": args.n_boot,
        "fairlearn_boot": args.fairlearn_boot,
        "factors": FACTORS,
        "seconds": {"retfm_images": t_ours, "retfm_patients": t_clustered,
                    "fairlearn": t_fairlearn, "fairlearn_scaled_to_n_boot": t_fairlearn_equiv},
        "speedup": speedup,
        "max_abs_endpoint_diff": float(both[["diff_lo", "diff_hi"]].to_numpy().max()),
        "max_abs_estimate_diff": est_diff,
        "all_endpoints_agree": bool(both["agree"].all()),
        "rows": both[cols].to_dict(orient="records"),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
