"""Benchmark: sample two paper-size cohorts (904,170-row site pools) and validate their metadata.

Steps, each timed (wall and process-CPU seconds: on a shared machine CPU time is the steadier
number) with the process's peak RSS so far (ru_maxrss) and its growth
during the step; ``--heap`` adds tracemalloc's Python-heap peak (it slows every step ~3x, so it
is off by default):

1. generate two site pools (numpy, vectorised; hospital-like and screening-like populations);
   not part of the pipeline, so not in the total,
2. validate each pool with the project's site-metadata suite
   (``retfm.validation.runner.run_site_suite``: Great Expectations, no image checks),
3. sample each site's cohort, strategies ``matched`` and ``random``, and compare the two sites,
4. the obvious alternatives, as a ratio to ``sample_cohort`` on the same subset of patients:
   pandas ``groupby().sample`` and a per-patient Python loop (full-pool times of the alternatives
   are estimated linearly from the subset: both take minutes at full size on a shared machine).

Targets (DESIGN): steps 2-3 <= 10 s and <= 2 GiB on 2 cores. Run from the repo root:
``.venv/bin/python benchmarks/bench_cohorts.py [--rows 904170] [--size 400000]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retfm.cohorts import sample_cohort
from retfm.cohorts.balance import balance_report
from retfm.settings import load_settings

ROWS = 904_170
AGE_EDGES = [40.0, 60.0, 80.0]
BALANCE_ON = ["age_band", "sex"]
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bench_cohorts.json"

# site -> (age mean, age sd, share female, ethnicity shares, cameras)
POPULATIONS: dict[str, dict[str, Any]] = {
    "hospital": {
        "age": (62.0, 17.0),
        "female": 0.47,
        "ethnicity": {
            "white": 0.55,
            "south_asian": 0.17,
            "black": 0.12,
            "east_asian": 0.05,
            "mixed": 0.04,
            "other": 0.04,
            "unknown": 0.03,
        },
        "camera": {"topcon_trc": 0.6, "zeiss_visucam": 0.3, "optos": 0.1},
    },
    "screening": {
        "age": (52.0, 11.0),
        "female": 0.58,
        "ethnicity": {"east_asian": 0.97, "other": 0.02, "unknown": 0.01},
        "camera": {"canon_cr2": 0.7, "topcon_nw400": 0.3},
    },
}


def make_site_pool(site: str, rows: int, seed: int) -> pd.DataFrame:
    """``rows`` images of ~rows/3 patients (1-5 images each), vectorised."""
    spec = POPULATIONS[site]
    rng = np.random.default_rng(seed)
    per_patient = rng.choice([1, 2, 3, 4, 5], size=rows, p=[0.2, 0.35, 0.2, 0.15, 0.1])
    n_patients = int(np.searchsorted(np.cumsum(per_patient), rows)) + 1
    per_patient = per_patient[:n_patients]
    per_patient[-1] -= int(per_patient.sum()) - rows
    pid = np.repeat(np.arange(n_patients), per_patient)
    within = np.arange(rows) - np.repeat(np.cumsum(per_patient) - per_patient, per_patient)
    mean, sd = spec["age"]
    age = np.clip(rng.normal(mean, sd, n_patients), 18.0, 100.0).round(1)
    sex = np.where(rng.random(n_patients) < spec["female"], "F", "M")
    eth_levels, eth_p = zip(*spec["ethnicity"].items(), strict=True)
    ethnicity = rng.choice(np.array(eth_levels), size=n_patients, p=np.array(eth_p))
    cam_levels, cam_p = zip(*spec["camera"].items(), strict=True)
    patient_ids = np.char.add(site[0].upper(), np.char.zfill(np.arange(n_patients).astype(str), 7))
    image_ids = np.char.add(np.char.add(patient_ids[pid], "-"), within.astype(str))
    frame = pd.DataFrame(
        {
            "image_id": image_ids,
            "patient_id": patient_ids[pid],
            "path": np.char.add(np.char.add("images/", image_ids), ".jpg"),
            "age": age[pid],
            "sex": sex[pid],
            "ethnicity": ethnicity[pid],
            "eye": np.where(within % 2 == 0, "R", "L"),
            "camera": rng.choice(np.array(cam_levels), size=rows, p=np.array(cam_p)),
            "diagnosis": rng.choice(np.array(["normal", "dr", "amd", "glaucoma"]), size=rows),
        }
    )
    # The CSV order is not patient order: sampling must not depend on it.
    frame = frame.iloc[rng.permutation(rows)].reset_index(drop=True)
    frame["row"] = np.arange(2, rows + 2)
    return frame


def timed(step: str, fn: Callable[[], Any], table: list[dict[str, Any]], heap: bool) -> Any:
    gc.collect()
    rss_before = _rss_peak_mib()
    if heap:
        tracemalloc.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn()
    wall = time.perf_counter() - start
    row = {
        "step": step,
        "wall_s": round(wall, 3),
        "cpu_s": round(time.process_time() - cpu_start, 3),
    }
    if heap:
        row["heap_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    row["rss_peak_mib"] = round(_rss_peak_mib(), 1)
    row["rss_growth_mib"] = round(row["rss_peak_mib"] - rss_before, 1)
    table.append(row)
    print(f"  {step:<48} {wall:8.3f} s  RSS peak {row['rss_peak_mib']:8.1f} MiB", flush=True)
    return out


def _rss_peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def site_validator() -> Callable[[pd.DataFrame, str], Any] | None:
    """The validation helper's in-memory site suite, or None where it is not importable."""
    try:
        from retfm.validation.runner import run_site_suite
    except ImportError:
        return None
    settings = load_settings(ROOT / "params.yaml")

    def run(frame: pd.DataFrame, site: str) -> Any:
        result = run_site_suite(frame, settings, name=site)
        if not result.success:
            raise RuntimeError(f"benchmark pool {site!r} failed validation: {result}")
        return result

    return run


def groupby_sample(pool: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """The obvious pandas way: shuffle patients with groupby().sample, then take rows to size."""
    patients = pool[["patient_id"]].drop_duplicates()
    order = patients.sample(frac=1.0, random_state=seed)["patient_id"]
    rank = pd.Series(np.arange(len(order)), index=order.to_numpy())
    shuffled = pool.groupby("patient_id", sort=False, group_keys=False).sample(
        frac=1.0, random_state=seed
    )
    shuffled = shuffled.assign(_r=shuffled["patient_id"].map(rank)).sort_values("_r", kind="stable")
    return shuffled.iloc[:size]


def loop_sample(pool: pd.DataFrame, size: int, seed: int) -> list[int]:
    """A per-patient Python loop: the approach sampling.py replaces."""
    rng = np.random.default_rng(seed)
    groups = pool.groupby("patient_id", sort=True).indices
    patients = sorted(groups)
    rng.shuffle(patients)
    chosen: list[int] = []
    for p in patients:
        rows = list(groups[p])
        rng.shuffle(rows)
        chosen.extend(rows[: size - len(chosen)])
        if len(chosen) >= size:
            break
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--size", type=int, default=400_000, help="cohort images per site")
    parser.add_argument("--subset", type=int, default=90_000, help="rows for the alternatives")
    parser.add_argument("--heap", action="store_true", help="also trace the Python heap")
    args = parser.parse_args()
    table: list[dict[str, Any]] = []

    def step(name: str, fn: Callable[[], Any]) -> Any:
        return timed(name, fn, table, args.heap)

    print(f"bench_cohorts: {args.rows:,} rows per site, cohorts of {args.size:,} images")
    pools = {
        site: step(f"generate {site}", lambda s=site, i=i: make_site_pool(s, args.rows, i))
        for i, site in enumerate(POPULATIONS)
    }
    validate = site_validator()
    if validate is None:
        print("  (retfm.validation.runner.run_site_suite not importable: timing sampling only)")
    else:
        for site, pool in pools.items():
            step(f"validate {site} (GX site suite)", lambda p=pool, s=site: validate(p, s))

    cohorts: dict[str, dict[str, pd.DataFrame]] = {}
    for strategy in ("matched", "random"):
        for site, pool in pools.items():
            result = step(
                f"sample {site} {strategy}",
                lambda p=pool, s=site, st=strategy: sample_cohort(
                    p,
                    site=s,
                    size=args.size,
                    strategy=st,
                    balance_on=BALANCE_ON,
                    seed=0,
                    age_edges=AGE_EDGES,
                    pools=pools,
                ),
            )
            cohorts.setdefault(strategy, {})[site] = result.cohort
    smd = {
        strategy: step(
            f"balance report {strategy}",
            lambda c=c: balance_report(c, ["age", *BALANCE_ON], AGE_EDGES),
        )["max_abs_smd"]
        for strategy, c in cohorts.items()
    }
    pipeline_wall = sum(r["wall_s"] for r in table if not r["step"].startswith("generate"))
    pipeline_cpu = sum(r["cpu_s"] for r in table if not r["step"].startswith("generate"))
    pipeline_rss = _rss_peak_mib()

    pool = pools["hospital"]
    keep = pool["patient_id"].drop_duplicates().sort_values().iloc[: args.subset // 3]
    subset = pool[pool["patient_id"].isin(set(keep))].reset_index(drop=True)
    size = len(subset) // 2
    label = f"({len(subset):,} rows)"
    step(f"subset: ours random {label}", lambda: sample_cohort(subset, site="h", size=size))
    step(f"subset: groupby().sample {label}", lambda: groupby_sample(subset, size, 0))
    step(f"subset: python loop {label}", lambda: loop_sample(subset, size, 0))

    by_step = {row["step"]: row["wall_s"] for row in table}
    ours_sub = by_step[f"subset: ours random {label}"]
    scale = args.rows / len(subset)
    summary = {
        "rows_per_site": args.rows,
        "cohort_size": args.size,
        "validation": "retfm.validation.runner.run_site_suite" if validate else None,
        "pipeline_wall_s": round(pipeline_wall, 3),
        "pipeline_cpu_s": round(pipeline_cpu, 3),
        "pipeline_peak_rss_mib": round(pipeline_rss, 1),
        "sampling_wall_s": round(sum(v for k, v in by_step.items() if k.startswith("sample ")), 3),
        "subset_rows": len(subset),
        "ratio_groupby_over_ours_subset": round(
            by_step[f"subset: groupby().sample {label}"] / ours_sub, 2
        ),
        "ratio_loop_over_ours_subset": round(by_step[f"subset: python loop {label}"] / ours_sub, 2),
        "full_pool_estimate_s": {
            "groupby_sample": round(by_step[f"subset: groupby().sample {label}"] * scale, 1),
            "python_loop": round(by_step[f"subset: python loop {label}"] * scale, 1),
            "ours_measured": by_step["sample hospital random"],
        },
        "max_abs_smd_between_sites": smd,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "machine": {
            "python": platform.python_version(),
            "cpus": len(os.sched_getaffinity(0)),
            "numpy": np.__version__,
            "pandas": pd.__version__,
        },
    }
    print()
    print(f"{'step':<50}{'wall s':>9}{'CPU s':>8}{'RSS peak MiB':>14}{'RSS +MiB':>10}")
    for row in table:
        print(
            f"{row['step']:<50}{row['wall_s']:>9.3f}{row['cpu_s']:>8.3f}{row['rss_peak_mib']:>14.1f}"
            f"{row['rss_growth_mib']:>10.1f}"
        )
    print()
    for key, value in summary.items():
        print(f"{key}: {value}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"steps": table, "summary": summary}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
