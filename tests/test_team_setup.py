"""``retfm server --local``'s first day: stable ports kept in its workdir, lines to paste."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from retfm.team import S3Service, first_day_lines, local_ports
from retfm.team.services import DEFAULT_LOCAL_PORTS

ROOT = Path(__file__).resolve().parents[1]


def test_ports_are_stable_across_restarts_and_options_win(tmp_path: Path) -> None:
    assert local_ports(tmp_path, {"s3": None, "postgres": None}) == DEFAULT_LOCAL_PORTS
    assert local_ports(tmp_path, {"s3": 9100, "postgres": None})["s3"] == 9100
    # the next start without options keeps what the team's .dvc/config now points at
    assert local_ports(tmp_path, {"s3": None, "postgres": None})["s3"] == 9100
    assert json.loads((tmp_path / "ports.json").read_text())["s3"] == 9100


def test_pasted_lines_keep_keys_out_of_the_committed_config(tmp_path: Path) -> None:
    s3 = S3Service("http://127.0.0.1:9100", "AK", "SK", ("mlflow", "dvc"), tmp_path, tmp_path)
    lines = first_day_lines("http://127.0.0.1:5000", s3, "dvc").splitlines()
    assert lines[0] == "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
    assert "dvc remote add -d -f team s3://dvc/study" in lines
    assert all("--local" in x for x in lines if "AK" in x or "SK" in x)


def test_the_server_workdir_is_git_ignored() -> None:
    proc = subprocess.run(
        ["git", "check-ignore", "-q", ".retfm-server/s3/s3.json"], cwd=ROOT, check=False
    )
    assert proc.returncode == 0, ".retfm-server/ (credentials) would be committed by git add -A"
