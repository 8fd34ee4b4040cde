"""The committed data.dvc is exactly what the generator writes: same seed, same bytes."""

from __future__ import annotations

import pytest
import yaml

pytestmark = pytest.mark.e2e


def test_generator_reproduces_committed_data_dvc(tmp_path, clone, sh) -> None:  # noqa: ANN001
    repo = clone(tmp_path / "repo", profile=None)  # the demo profile, as committed
    committed = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]
    sh(["retfm", "synth", "--if-needed"], repo)
    sh(["dvc", "add", "-q", "data"], repo)
    regenerated = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]
    assert regenerated["md5"] == committed["md5"]
    assert regenerated["nfiles"] == committed["nfiles"]
