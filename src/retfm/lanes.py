"""``retfm repro --jobs N``: the pipeline's independent stages in N lanes, on one checkout.

``dvc repro`` runs one stage at a time. A replicated study has many small independent stages
(a cohort, a pack, a pre-training, a registration per replicate; an adaptation per replicate
and task) whose time is mostly single-threaded Python start-up, so a 2-core laptop sits half
idle. DVC releases its repository lock while a stage's command runs, so several
``dvc --wait-for-lock repro -s <stage>`` processes can run at once and each records its stage
in ``dvc.lock`` (README, "Running the grid"). This runs the pipeline layer by layer (every
stage of one kind is independent of the others of its kind), each layer's stages in ``jobs``
lanes, then one plain ``dvc repro`` for what is left (nothing, or evaluate and compare). A
stage that is up to date is skipped by DVC as usual; a failing one stops the run after the
lanes running finish, with its output on screen.

The lanes share the cores: the demo's ``pretrain.num_threads`` is 1, so two pre-trainings
run at once, one thread each (1.16x the images/s of one run on two threads on the demo's
micro-ViT, ``benchmarks/bench_demo_pretrain.py``). The lanes never change a setting: a stage
run here and the same stage rerun alone by ``dvc repro -f`` compute the same bytes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

#: Stage kinds in pipeline order; the stages of one kind never depend on each other.
LAYERS = (
    ("validate",),
    ("cohort",),
    ("pack_cohort", "pack_task"),
    ("pretrain",),
    ("register",),
    ("adapt",),
)


def dvc_executable() -> str:
    """The dvc beside this Python (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else (shutil.which("dvc") or "dvc")


def stage_names(
    root: Path = Path("."),
    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> list[str]:
    """Every stage of the project's pipeline (foreach/matrix expanded), in dvc.yaml order."""
    proc = runner([dvc_executable(), "stage", "list", "--name-only"], cwd=root,
                  capture_output=True, text=True, check=True)  # fmt: skip
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def stage_layers(names: Sequence[str]) -> list[list[str]]:
    """The pipeline's stages grouped into :data:`LAYERS` (unknown kinds are left to the final
    ``dvc repro``)."""
    layers = []
    for kinds in LAYERS:
        mine = [n for n in names if n.split("@")[0] in kinds]
        if mine:
            layers.append(mine)
    return layers


def run_lanes(
    root: Path,
    jobs: int,
    *,
    echo: Callable[[str], None] = print,
    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    progress: bool = True,
) -> int:
    """Reproduce the pipeline in ``root`` with ``jobs`` lanes; return the exit status. A
    progress bar per layer counts its finished stages (``progress``)."""
    names = stage_names(root, runner)
    start = time.perf_counter()

    def one(stage: str) -> tuple[subprocess.CompletedProcess, float]:
        began = time.perf_counter()
        done = runner([dvc_executable(), "--wait-for-lock", "repro", "-s", stage], cwd=root,
                      capture_output=True, text=True)  # fmt: skip
        return done, time.perf_counter() - began

    for layer in stage_layers(names):
        kinds = sorted({n.split("@")[0] for n in layer})
        echo(f"{', '.join(kinds)}: {len(layer)} stage(s) in {min(jobs, len(layer))} lane(s)")
        failed = []
        bar = tqdm(total=len(layer), desc="  stages", unit="stage", leave=False,
                   disable=not progress)  # fmt: skip
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(one, stage): stage for stage in layer}
            for future in as_completed(futures):
                bar.update(1)
                stage, (r, took) = futures[future], future.result()
                if r.returncode != 0:
                    failed.append((stage, r))
                    state = "FAILED"
                else:
                    state = f"ran in {took:.0f} s" if "Running stage" in r.stdout else "up to date"
                line = f"  {stage}: {state} ({time.perf_counter() - start:.0f} s so far)"
                if progress and echo is print:
                    tqdm.write(line)  # above the bar
                else:
                    echo(line)
        bar.close()
        if failed:
            for stage, r in failed:
                echo(f"\nstage {stage} failed ({r.returncode}):\n{r.stdout[-3000:]}"
                     f"{r.stderr[-3000:]}")  # fmt: skip
            return 1
    return subprocess.run([dvc_executable(), "repro"], cwd=root).returncode
