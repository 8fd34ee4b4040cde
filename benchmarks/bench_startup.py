"""Stage start-up: how long each pipeline stage takes before it can do anything useful.

For every stage module (``pipelines/<stage>.py``) a fresh interpreter imports it, as DVC's
``python -m pipelines.<stage>`` does before ``main`` runs; wall time, median of ``--rounds``,
against a bare ``python -c pass`` in the same rounds. ``python -X importtime`` then names the
heaviest top-level imports of each module (cumulative microseconds), which is where a cut
would have to come from.

Run: ``python benchmarks/bench_startup.py`` (writes benchmarks/results/bench_startup.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "bench_startup.json"
STAGES = ("validate", "cohort", "pack", "pretrain", "register", "adapt", "evaluate", "compare")
#: Whether the stage trains a network (the issue's <= 3 s target is for the others).
TRAINS = {"pretrain", "adapt"}


def _time(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return time.perf_counter() - start


def _heaviest(module: str, top: int = 6) -> list[tuple[str, float]]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                          cwd=ROOT, capture_output=True, text=True, check=True)  # fmt: skip
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        if depth == 1:  # what the stage module imports directly
            rows.append((name.strip(), int(parts[1]) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    seen: dict[str, list[float]] = {"python -c pass": []}
    for _ in range(args.rounds):
        seen["python -c pass"].append(_time("pass"))
        for stage in STAGES:
            seen.setdefault(stage, []).append(_time(f"import pipelines.{stage}"))
    out = {}
    for name, times in seen.items():
        med = statistics.median(times)
        out[name] = {"seconds": round(med, 2), "rounds": [round(t, 2) for t in times]}
        if name in STAGES:
            out[name]["trains"] = name in TRAINS
            out[name]["heaviest_imports_s"] = _heaviest(f"pipelines.{name}")
        print(f"{name:16s} {med:5.2f} s", flush=True)
    for stage in STAGES:
        heavy = ", ".join(f"{m} {s:.2f}" for m, s in out[stage]["heaviest_imports_s"][:4])
        print(f"  {stage}: {heavy}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
