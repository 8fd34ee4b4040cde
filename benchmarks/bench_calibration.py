"""How often does the study call a difference that is not there, and find one that is?

Runs the study's own analysis (``retfm.evaluation.analysis.analyse_study``, the code the
compare stage runs) on simulated studies shaped like the demo (three tasks of different
difficulty, class count, prevalence and age / sex / ethnicity mix; patients with 1-4 images;
FMs that differ per image while equally good on average; 3 adaptation seeds; each FM
pre-trained ``--replicates`` times, every run's population AUROC its own draw with sd
``--draw-sd``: the sites' *data* equally good, one draw favouring either):

* false-positive rate of every decision under the null (the data-level verdicts; the per-run
  test beside them), over ``--null`` studies (>= 500) at 600 test images per task, and over
  fewer studies at 120 and 2,000 test images, with seed noise from low (AUROC sd over seeds
  ~0.002) to high (~0.02), with two replicates per site, and with draw sds 0.01 and 0.03;
* how often the single-draw (per-run) test calls the aligned FM better when only draws differ
  (draw sd 0.01-0.03, one run per site);
* power: the aligned site's population AUROC advantage (0.02-0.08) at 120, 600 and 2,000 test
  images per task and at K = 1, 2, 3, 5 runs per site, and an age effect inside every task;
* beside them, RETFound's t-test over seeds on the same null studies, to show what the
  deciding test replaced.

Run: ``python benchmarks/bench_calibration.py`` (about 6.5 minutes on 2 cores; writes
benchmarks/results/bench_calibration.json). ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from retfm.evaluation.analysis import AnalysisConfig
from retfm.evaluation.calibration import calibrate_null, calibration_report, with_draw_auroc
from retfm.evaluation.simulation import Noise, demo_like_design
from retfm.reporting.calibration import format_calibration

RESULTS = Path(__file__).parent / "results" / "bench_calibration.json"
SEED_NOISE = {
    "low seed noise": Noise(seed_image=0.03, seed_shift=0.005),
    "high seed noise": Noise(seed_image=0.3, seed_shift=0.06),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--null", type=int, default=500, help="null studies at the main design")
    parser.add_argument("--power", type=int, default=200, help="studies per power cell")
    parser.add_argument("--replicates", type=int, default=3, help="pre-training runs per FM")
    parser.add_argument("--draw-sd", type=float, default=0.02, help="between-draw AUROC sd")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few studies")
    args = parser.parse_args()
    null, power = (60, 16) if args.quick else (args.null, args.power)
    config = AnalysisConfig()
    base = demo_like_design(600).with_replicates(args.replicates)
    design = with_draw_auroc(base, args.draw_sd)
    start = time.perf_counter()
    report = calibration_report(design, config, null_studies=null, power_studies=power)
    variants = {
        **{name: with_draw_auroc(replace(base, noise=noise), args.draw_sd)
           for name, noise in SEED_NOISE.items()},
        "two runs per site": with_draw_auroc(base.with_replicates(2), args.draw_sd),
        "draw sd 0.01": with_draw_auroc(base, 0.01),
        "draw sd 0.03": with_draw_auroc(base, 0.03),
    }  # fmt: skip
    for i, (name, variant) in enumerate(variants.items()):
        report["null_by_test_size"][name] = calibrate_null(
            variant, config, max(60, null // 3), seed=7 + i
        )
    report["within_target"] = report["within_target"] and all(
        r["within_target"] for r in report["null_by_test_size"].values()
    )
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(format_calibration(report))
    print(f"({report['seconds']} s)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
