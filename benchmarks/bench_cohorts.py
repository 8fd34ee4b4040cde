"""Benchmark: sample two paper-size cohorts (904,170-row site pools) and validate their metadata.

Steps, each timed (wall seconds) with the process's peak RSS after it (ru_maxrss) and the peak
Python-heap growth during it (tracemalloc; numpy buffers are included, pandas' Arrow buffers are
not, hence both numbers):

1. generate two site pools (numpy, vectorised; hospital-like and screening-like populations),
2. validate each pool with the project's site-metadata suite (``retfm.validation``), if present,
3. sample each site's cohort, strategies ``matched`` and ``random``,
4. the obvious alternative, as a ratio: pandas ``groupby().sample`` of patients, and a per-patient
   Python loop (timed on a subset and scaled linearly, since the full loop takes minutes).

Targets (DESIGN): whole run <= 10 s and <= 2 GiB on 2 cores. Run:
``.venv/bin/python benchmarks/bench_cohorts.py [--rows 904170] [--size 400000]``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
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

ROWS = 904_170
AGE_EDGES = [40.0, 60.0, 80.0]
BALANCE_ON = ["age_band", "sex"]
RESULTS = Path(__file__).parent / "results" / "bench_cohorts.json"

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


def timed(step: str, fn: Callable[[], Any], table: list[dict[str, Any]]) -> Any:
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - start
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    table.append(
        {
            "step": step,
            "wall_s": round(wall, 3),
            "heap_peak_mib": round(heap_peak / 2**20, 1),
            "rss_peak_mib": round(_rss_peak_mib(), 1),
        }
    )
    print(f"  {step:<46} {wall:8.3f} s  heap {heap_peak / 2**20:7.1f} MiB", flush=True)
    return out


def _rss_peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def find_site_validator() -> tuple[str, Callable[[pd.DataFrame, str], Any]] | None:
    """The other helper's site-metadata suite runner, if it exists yet (looked up by name)."""
    candidates = [
        (
            "retfm.validation.metadata",
            ("validate_site_metadata", "validate_site", "run_site_suite"),
        ),
        ("retfm.validation.suites", ("validate_site_metadata", "validate_site", "run_site_suite")),
        ("retfm.validation", ("validate_site_metadata", "validate_site", "run_site_suite")),
    ]
    for module_name, names in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in names:
            fn = getattr(module, name, None)
            if callable(fn):
                return f"{module_name}.{name}", _adapt_validator(fn)
    return None


def _adapt_validator(fn: Callable[..., Any]) -> Callable[[pd.DataFrame, str], Any]:
    params = inspect.signature(fn).parameters

    def run(frame: pd.DataFrame, site: str) -> Any:
        kwargs: dict[str, Any] = {}
        if "site" in params:
            kwargs["site"] = site
        if "check_images" in params:
            kwargs["check_images"] = False
        return fn(frame, **kwargs)

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
    parser.add_argument("--loop-subset", type=int, default=60_000)
    args = parser.parse_args()
    table: list[dict[str, Any]] = []
    print(f"bench_cohorts: {args.rows:,} rows per site, cohorts of {args.size:,} images")

    pools = {
        site: timed(f"generate {site}", lambda s=site, i=i: make_site_pool(s, args.rows, i), table)
        for i, site in enumerate(POPULATIONS)
    }
    validator = find_site_validator()
    if validator:
        name, run = validator
        for site, pool in pools.items():
            timed(
                f"validate {site} ({name.rsplit('.', 1)[-1]})",
                lambda p=pool, s=site: run(p, s),
                table,
            )
    else:
        print("  (no site-metadata validation suite in retfm.validation yet: timing sampling only)")

    cohorts: dict[str, dict[str, pd.DataFrame]] = {}
    for strategy in ("matched", "random"):
        for site, pool in pools.items():
            result = timed(
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
                table,
            )
            cohorts.setdefault(strategy, {})[site] = result.cohort
    balance = {
        strategy: timed(
            f"balance report {strategy}",
            lambda c=c: balance_report(c, ["age", *BALANCE_ON], AGE_EDGES),
            table,
        )["max_abs_smd"]
        for strategy, c in cohorts.items()
    }

    pool = pools["hospital"]
    timed("alt: groupby().sample hospital", lambda: groupby_sample(pool, args.size, 0), table)
    subset_patients = (
        pool["patient_id"].drop_duplicates().sort_values().iloc[: args.loop_subset // 3]
    )
    subset = pool[pool["patient_id"].isin(set(subset_patients))]
    sub_size = len(subset) // 2
    timed(
        f"alt: python loop ({len(subset):,} rows)", lambda: loop_sample(subset, sub_size, 0), table
    )
    timed(
        f"ours on same subset ({len(subset):,} rows)",
        lambda: sample_cohort(subset, site="hospital", size=sub_size, seed=0),
        table,
    )

    by_step = {row["step"]: row["wall_s"] for row in table}
    ours_random = by_step["sample hospital random"]
    ours_subset = table[-1]["wall_s"]
    loop_subset = table[-2]["wall_s"]
    summary = {
        "rows_per_site": args.rows,
        "cohort_size": args.size,
        "validation": validator[0] if validator else None,
        "total_wall_s": round(
            sum(r["wall_s"] for r in table if not r["step"].startswith(("alt", "ours"))), 3
        ),
        "sampling_wall_s": round(sum(v for k, v in by_step.items() if k.startswith("sample ")), 3),
        "peak_rss_mib": round(_rss_peak_mib(), 1),
        "ratio_groupby_over_ours": round(
            by_step["alt: groupby().sample hospital"] / ours_random, 2
        ),
        "ratio_loop_over_ours_same_subset": round(loop_subset / ours_subset, 2),
        "loop_full_pool_estimate_s": round(loop_subset * args.rows / len(subset), 1),
        "max_abs_smd_between_sites": balance,
        "machine": {
            "python": platform.python_version(),
            "cpus": _cpus(),
            "numpy": np.__version__,
            "pandas": pd.__version__,
        },
    }
    print()
    print(f"{'step':<48}{'wall s':>9}{'heap MiB':>10}{'RSS MiB':>10}")
    for row in table:
        print(
            f"{row['step']:<48}{row['wall_s']:>9.3f}{row['heap_peak_mib']:>10.1f}{row['rss_peak_mib']:>10.1f}"
        )
    print()
    for key, value in summary.items():
        print(f"{key}: {value}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"steps": table, "summary": summary}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    main()
