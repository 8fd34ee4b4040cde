"""``retfm repro --jobs``: stages grouped into layers of independent stages, run in lanes; a
failing stage stops the run and is named."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from retfm.lanes import run_lanes, stage_layers

NAMES = ["validate", "cohort@a-r0", "cohort@a-r1", "pack_cohort@a-r0", "pack_task@t",
         "pretrain@m-r0", "pretrain@m-r1", "register@m-r0", "adapt@m-r0-t", "evaluate",
         "compare"]  # fmt: skip


def test_layers_follow_the_pipeline_and_leave_the_study_stages_to_dvc() -> None:
    assert stage_layers(NAMES) == [
        ["validate"],
        ["cohort@a-r0", "cohort@a-r1"],
        ["pack_cohort@a-r0", "pack_task@t"],
        ["pretrain@m-r0", "pretrain@m-r1"],
        ["register@m-r0"],
        ["adapt@m-r0-t"],
    ]


class _FakeDvc:
    """Records the commands; ``repro -s`` stages take 0.2 s, one of them may fail."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail, self.calls, self.active, self.peak = fail, [], 0, 0
        self.lock = threading.Lock()

    def __call__(self, cmd, cwd, **kw) -> subprocess.CompletedProcess:  # noqa: ANN001
        self.calls.append(cmd[1:])
        if cmd[1:3] == ["stage", "list"]:
            return subprocess.CompletedProcess(cmd, 0, "\n".join(NAMES), "")
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.2)
        with self.lock:
            self.active -= 1
        code = 255 if cmd[-1] == self.fail else 0
        return subprocess.CompletedProcess(cmd, code, f"Running stage '{cmd[-1]}'", "boom")


def test_each_layer_runs_in_lanes_and_a_failure_stops_before_the_next(tmp_path: Path) -> None:
    fake = _FakeDvc(fail="pretrain@m-r1")
    lines: list[str] = []
    assert run_lanes(tmp_path, 2, echo=lines.append, runner=fake, progress=False) == 1
    assert fake.peak == 2  # two stages of one layer at once
    ran = [c[-1] for c in fake.calls if "repro" in c]
    assert "register@m-r0" not in ran and "pretrain@m-r0" in ran  # stopped after the layer
    assert all(c[:3] == ["--wait-for-lock", "repro", "-s"] for c in fake.calls if "repro" in c)
    assert any("stage pretrain@m-r1 failed (255)" in line and "boom" in line for line in lines)
