"""Does the demo find what was planted, and nothing else? The study at demo size, three times.

1. ``planted``: params.yaml as committed (age effect ``age_visibility: 0.8``, alignment effect
   ``alignment: {hospital: 1.0}``). Expected: age flagged, sex and ethnicity not; the aligned
   FM better on hospital_dr (planted), no evidence on screening_dr (not planted).
2. ``no-effects``: ``profiles/no-effects.yaml`` (every ``synthetic.effects`` knob at 0).
   Expected: no factor flagged, no FM called better anywhere.
3. ``no-alignment``: the demo with only the alignment knob at 0, reported, not judged: how
   much of the aligned FM's advantage is planted by the knob, how much by the population gap
   (the specialist hospital's pool holds more disease).

Each scenario runs in a fresh copy of the repository (the files git ships): ``retfm synth``
then ``retfm repro --jobs 2``, as ``make demo`` does. Takes about 2 x the demo's time.

4. ``--draws 1 2 ...``: the planted scenario again at other ``study.seed`` values, i.e. other
   cohorts drawn from the same site pools for every replicate and other pre-training
   randomness: recovery must not be a lucky draw. Judged like ``planted`` (the verdicts are
   the data-level ones, each FM's replicates pooled), and reported: how far the pooled
   difference moves between study draws, against its own standard error.
   ``--with-committed`` adds the committed demo (``outputs/study/summary.json``, study.seed 0)
   as one more draw.

Run: ``python benchmarks/bench_recovery.py`` (writes benchmarks/results/bench_recovery.json);
``--only planted`` or ``--only no-effects`` runs one scenario; ``--only none --draws 1 2
--with-committed`` only the draws.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from retfm.profiles import apply_overrides, fresh_copy
from retfm.reporting.summary import factor_verdicts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "bench_recovery.json"
#: scenario -> (profile, extra overrides); "no-alignment" is reported, not judged: it shows how
#: much of the aligned FM's advantage the alignment knob plants (the rest is the population gap).
SCENARIOS: dict[str, tuple[str | None, dict]] = {
    "planted": (None, {}),
    "no-effects": ("no-effects", {}),
    "no-alignment": (None, {"synthetic": {"effects": {"alignment": {}}}}),
}


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(
            f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def findings(summary: dict[str, Any]) -> dict[str, Any]:
    """What a study flagged: factor verdicts, per-task comparison and alignment verdicts."""
    return {
        "factors": factor_verdicts(summary["factors"]),  # per metadata factor, any grouping
        "factor_gaps": {f["factor"]: f["gap_verdict"] for f in summary["factors"]},
        "comparisons": {
            t["task"]: [c["verdict"] for c in t["comparisons"]] for t in summary["tasks"]
        },
        "alignment": {t["task"]: t["alignment"] for t in summary["tasks"] if t["alignment"]},
    }


def expectations(name: str, found: dict[str, Any]) -> dict[str, bool]:
    """Each expected outcome of a scenario, True when met."""
    factors, align = found["factors"], found["alignment"]
    decided = [v for vs in found["comparisons"].values() for v in vs if v.endswith("better")]
    if name == "no-alignment":
        return {}
    if name == "planted":
        return {
            "age flagged": factors.get("age") == "effect",
            "sex not flagged": factors.get("sex") != "effect",
            "ethnicity not flagged": factors.get("ethnicity") != "effect",
            "aligned FM better on hospital_dr (planted)": align.get("hospital_dr") == "better",
            "no alignment verdict on screening_dr (not planted)": (
                align.get("screening_dr") == "no evidence"
            ),
        }
    return {
        "no factor flagged": all(v != "effect" for v in factors.values()),
        "no factor changes the FM gap": all(v != "effect" for v in found["factor_gaps"].values()),
        "no FM called better on any task": not decided,
    }


def run_scenario(name: str, profile: str | None, overrides: dict, work: Path) -> dict[str, Any]:
    repo = fresh_copy(ROOT, work / name, profile)
    if overrides:
        apply_overrides(repo / "params.yaml", overrides)
    start = time.perf_counter()
    _run(["retfm", "synth"], repo)
    _run(["dvc", "add", "-q", "data"], repo)
    _run(["retfm", "repro", "--jobs", "2"], repo)
    seconds = time.perf_counter() - start
    return judged(name, json.loads((repo / "outputs" / "study" / "summary.json").read_text()),
                  seconds)  # fmt: skip


def judged(name: str, summary: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    """A scenario's findings from its summary, with its expectations checked."""
    found = findings(summary)
    found["differences"] = {
        t["task"]: [c["diff"] for c in t["comparisons"]] for t in summary["tasks"]
    }
    found["draw_auroc_sd"] = (summary["methods"].get("calibration") or {}).get("draw_auroc_sd")
    found["half_widths"] = {
        t["task"]: [round((c["hi"] - c["lo"]) / 2, 4) for c in t["comparisons"]]
        for t in summary["tasks"]
    }
    checks = expectations(name, found)
    return {
        "seconds": None if seconds is None else round(seconds, 1),
        "found": found,
        "checks": checks,
        "met": all(checks.values()),
    }


def spread(draws: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per task (first FM pair): the FM difference in each draw, its sd between draws, and the
    test's standard error within a draw, read off its 95% interval as half-width / 1.96 (the
    interval uses a t quantile, a little above 1.96, so this slightly overstates the SE)."""
    out: dict[str, Any] = {}
    tasks = next(iter(draws.values()))["found"]["differences"]
    for task in tasks:
        diffs = [d["found"]["differences"][task][0] for d in draws.values()]
        half = [d["found"]["half_widths"][task][0] for d in draws.values()]
        out[task] = {
            "differences": diffs,
            "verdicts": [d["found"]["comparisons"][task][0] for d in draws.values()],
            "sd_between_draws": round(statistics.stdev(diffs), 4) if len(diffs) > 1 else None,
            "se_within_draw": round(statistics.mean(half) / 1.96, 4),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=[*sorted(SCENARIOS), "none"])
    parser.add_argument("--draws", type=int, nargs="*", default=[], metavar="SEED",
                        help="rerun the planted scenario at these study.seed values")  # fmt: skip
    parser.add_argument("--with-committed", action="store_true",
                        help="count the committed demo (study.seed 0) as one draw")  # fmt: skip
    parser.add_argument("--keep", type=Path, help="keep the study copies in this folder")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    draws: dict[str, dict[str, Any]] = {}
    if args.with_committed:
        committed = json.loads((ROOT / "outputs" / "study" / "summary.json").read_text())
        draws["study.seed 0 (committed demo)"] = judged("planted", committed, None)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        for seed in args.draws:
            name = f"planted, study.seed {seed}"
            print(f"bench_recovery: {name} ...", flush=True)
            draws[name] = run_scenario("planted", None, {"study": {"seed": seed}},
                                       work / f"seed{seed}")  # fmt: skip
            print(f"  AUROC differences: {draws[name]['found']['differences']} "
                  f"({draws[name]['seconds']} s)")  # fmt: skip
            for check, ok in draws[name]["checks"].items():
                print(f"  {'PASS' if ok else 'FAIL'}  {check}")
        for name, (profile, overrides) in SCENARIOS.items():
            if args.only and name != args.only:
                continue
            print(f"bench_recovery: {name} ...", flush=True)
            results[name] = run_scenario(name, profile, overrides, work)
            diffs = results[name]["found"]["differences"]
            print(f"  AUROC differences (hospital - screening FM): {diffs}")
            for check, ok in results[name]["checks"].items():
                print(f"  {'PASS' if ok else 'FAIL'}  {check}")
            print(f"  ({results[name]['seconds']} s)")
    if draws:
        results["draws"] = {"draws": draws, "spread": spread(draws)}
        for task, row in results["draws"]["spread"].items():
            print(f"  {task}: differences {row['differences']} ({row['verdicts']}); sd between "
                  f"draws {row['sd_between_draws']}, test's SE within a draw "
                  f"{row['se_within_draw']}")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    RESULTS.write_text(json.dumps({**previous, **results}, indent=2) + "\n")
    if not all(r["met"] for k, r in results.items() if k != "draws") or not all(
        d["met"] for d in draws.values()
    ):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
