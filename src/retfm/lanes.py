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

Each pre-training lane gets ``RETFM_PRETRAIN_THREADS`` = cores / jobs (pipelines/pretrain.py
reads it in place of ``pretrain.num_threads``), so that the lanes share the cores rather than
oversubscribe them. The thread count is not a stage param: it changes speed, not results
beyond float summation order.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: Stage kinds in pipeline order; the stages of one kind never depend on each other.
LAYERS = (
    ("validate",),
    ("cohort",),
    ("pack_cohort", "pack_task"),
    ("pretrain",),
    ("register",),
    ("adapt",),
)


def _dvc() -> str:
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else "dvc"


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
) -> int:
    """Reproduce the pipeline in ``root`` with ``jobs`` lanes; return the exit status."""
    listed = runner([_dvc(), "stage", "list", "--name-only"], cwd=root, capture_output=True,
                    text=True, check=True)  # fmt: skip
    names = [n.strip() for n in listed.stdout.splitlines() if n.strip()]
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    env = {**os.environ, "RETFM_PRETRAIN_THREADS": str(threads)}
    start = time.perf_counter()

    def one(stage: str) -> subprocess.CompletedProcess:
        return runner([_dvc(), "--wait-for-lock", "repro", "-s", stage], cwd=root,
                      capture_output=True, text=True, env=env)  # fmt: skip

    for layer in stage_layers(names):
        kinds = sorted({n.split("@")[0] for n in layer})
        echo(f"{', '.join(kinds)}: {len(layer)} stage(s) in {min(jobs, len(layer))} lane(s)")
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(one, layer))
        ran = [s for s, r in zip(layer, results, strict=True) if "Running stage" in r.stdout]
        failed = [(s, r) for s, r in zip(layer, results, strict=True) if r.returncode != 0]
        echo(f"  ran {len(ran)}, up to date {len(layer) - len(ran) - len(failed)}"
             f" ({time.perf_counter() - start:.0f} s so far)")  # fmt: skip
        if failed:
            for stage, r in failed:
                echo(f"\nstage {stage} failed ({r.returncode}):\n{r.stdout[-3000:]}"
                     f"{r.stderr[-3000:]}")  # fmt: skip
            return 1
    return subprocess.run([_dvc(), "repro"], cwd=root).returncode
