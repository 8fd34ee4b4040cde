"""Every change takes effect and every record tells the truth, on the session's tiny study.

Each test leaves the study as it found it (a forced rerun must change nothing; tampered records
and params are restored), so the other end-to-end modules can share the one reproduced study.

* a forced rerun of a stage whose inputs did not change leaves its outputs byte-identical
  (``dvc.lock`` unchanged), so nothing cascades through the pipeline;
* changing ``cohort.images_per_site`` reruns the cohort, marks everything downstream stale, and the
  data card records the new size (the setting was called ``size``, which DVC's run cache cannot
  see: treeverse/dvc issue 10296);
* ``retfm doctor`` finds the study clean, and names a tampered data card, a stale setting and a
  tampered registry tag;
* a copied project does not write into the original's MLflow artifacts: it stops and says
  ``retfm relocate``, after which it works on its own artifacts.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from retfm.profiles import apply_overrides
from retfm.relink import TRACKED_STAGES
from retfm.team import missing_binaries

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("study")]  # one worker builds it

#: One stage of each kind, in pipeline order.
ALL_STAGES = (
    "validate",
    "cohort@hospital-r0",
    "pack_cohort@hospital-r0",
    "pack_task@hospital_dr",
    "pretrain@mae-hospital-r0",
    "register@mae-hospital-r0",
    "adapt@mae-hospital-r0-hospital_dr",
    "evaluate",
    "compare",
)
#: ``retfm relink`` force-reruns every stage of these kinds against the team server, and
#: test_team_mlflow.py then asserts that dvc.lock is byte-identical: where that test runs, the
#: forced reruns here are only the kinds relink leaves alone (a minute saved on 2 cores).
STAGES = (
    ALL_STAGES
    if missing_binaries()
    else tuple(s for s in ALL_STAGES if s.split("@")[0] not in TRACKED_STAGES)
)


@pytest.fixture(scope="module")
def records(study):  # noqa: ANN001, ANN201
    return study


def _lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


@pytest.mark.parametrize("stage", STAGES)
def test_forced_rerun_leaves_outputs_byte_identical(records, sh, stage: str) -> None:  # noqa: ANN001
    before = _lock(records.path)[stage]
    sh(["dvc", "repro", "--force", "--single-item", stage], records.path)
    after = _lock(records.path)[stage]
    changed = [o["path"] for o, n in zip(before["outs"], after["outs"], strict=True) if o != n]
    assert not changed, f"{stage}: a rerun with unchanged inputs changed {changed}"


def test_doctor_finds_a_clean_study(records, sh) -> None:  # noqa: ANN001
    out = sh(["retfm", "doctor"], records.path).stdout
    assert "all records agree" in out and "DISAGREES" not in out


def test_changing_the_cohort_size_reruns_it_and_marks_downstream_stale(records, sh) -> None:  # noqa: ANN001
    params = records.path / "params.yaml"
    original = params.read_text()
    n = yaml.safe_load(original)["cohort"]["images_per_site"]
    try:
        params.write_text(original.replace(f"images_per_site: {n}", f"images_per_site: {n - 10}"))
        out = sh(["dvc", "repro", "cohort@hospital-r0"], records.path).stdout
        assert "Running stage 'cohort@hospital-r0'" in out, out[-3000:]
        card = json.loads((records.path / "outputs/cohorts/hospital-r0/card/card.json").read_text())
        assert card["size"]["images"] == n - 10
        status = sh(["dvc", "status"], records.path).stdout
        # every site's cohort has this size, so both cohorts and everything below are stale
        for stage in ("cohort@screening-r0", "pack_cohort@hospital-r0", "register@mae-hospital-r0"):
            assert f"{stage}:" in status, status
    finally:
        params.write_text(original)
        sh(["dvc", "repro", "cohort@hospital-r0"], records.path)  # back from the run cache
    assert "all records agree" in sh(["retfm", "doctor"], records.path).stdout


def test_an_old_params_file_stops_at_the_door_naming_the_new_key(records, sh) -> None:  # noqa: ANN001
    params = records.path / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("images_per_site:", "size:"))
        proc = sh(["dvc", "repro", "cohort@hospital-r0"], records.path, check=False)
        assert proc.returncode != 0
        assert "cohort.size: renamed: use cohort.images_per_site" in proc.stderr + proc.stdout
    finally:
        params.write_text(original)
        sh(["dvc", "checkout", "-q"], records.path)  # DVC removed the stage's outs before it ran
    assert "up to date" in sh(["dvc", "status"], records.path).stdout


def test_doctor_names_each_tampered_record(records, sh) -> None:  # noqa: ANN001
    repo = records.path
    card_path = repo / "outputs/cohorts/hospital-r0/card/card.json"
    card_text = card_path.read_text()
    params = repo / "params.yaml"
    params_text = params.read_text()
    client = MlflowClient(records.tracking_uri, records.tracking_uri)
    version = client.get_model_version_by_alias("fm-mae-screening-r0", "candidate")
    true_md5 = version.tags["data.md5"]

    def disagreements() -> list[str]:
        proc = sh(["retfm", "doctor"], repo, check=False)
        assert proc.returncode == 1, proc.stdout
        return [line for line in proc.stdout.splitlines() if line.startswith("DISAGREES")]

    try:  # one tampered record at a time, each named
        card = json.loads(card_text)
        card["size"]["images"] += 1
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        found = disagreements()
        assert any("data card" in x and "hospital" in x and "holds" in x for x in found), found
        card_path.write_text(card_text)
        assert "strategy: stratified" in params_text  # profiles/tiny.yaml
        params.write_text(params_text.replace("strategy: stratified", "strategy: matched"))
        found = disagreements()
        assert any("cohort.strategy" in x and "matched" in x for x in found), found
        params.write_text(params_text)
        client.set_model_version_tag("fm-mae-screening-r0", version.version, "data.md5", "0" * 32)
        found = disagreements()
        assert any("fm-mae-screening-r0" in x and "data.md5" in x for x in found), found
    finally:
        card_path.write_text(card_text)
        params.write_text(params_text)
        client.set_model_version_tag("fm-mae-screening-r0", version.version, "data.md5", true_md5)
    assert "all records agree" in sh(["retfm", "doctor"], repo).stdout


@pytest.fixture(scope="module")
def colleague(records, sh, tmp_path_factory):  # noqa: ANN001, ANN201
    """A copy of the study (a moved folder, a colleague's copy), its store relocated."""
    copy = tmp_path_factory.mktemp("colleague") / "study"
    shutil.copytree(records.path, copy, symlinks=True)
    proc = sh(["dvc", "repro", "--force", "--single-item", "compare"], copy, check=False)
    moved = sh(["retfm", "relocate"], copy).stdout
    return copy, proc, moved


def test_a_copied_project_says_relocate_then_uses_its_own_artifacts(records, colleague, sh) -> None:  # noqa: ANN001, E501
    copy, refused, moved = colleague
    assert refused.returncode != 0
    message = refused.stderr + refused.stdout
    assert "retfm relocate" in message and "still exists (a copy)" in message
    assert "artifact locations moved" in moved
    sh(["dvc", "repro", "--force", "--single-item", "compare"], copy)
    assert "all records agree" in sh(["retfm", "doctor"], copy).stdout
    mine = list((copy / "mlruns/artifacts/study").rglob("report.html"))
    theirs = list((records.path / "mlruns/artifacts/study").rglob("report.html"))
    assert len(mine) == len(theirs) + 1  # the new run's report landed in the copy only


def test_a_study_pointed_at_another_store_stops_at_the_door_naming_relink(
    records, sh, tmp_path
) -> None:  # noqa: ANN001
    """(``retfm relink`` itself moves a study onto the team server: test_team_mlflow.py.)"""
    repo = records.path
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'team' / 'mlflow.db'}"}
    metrics = _tree(repo / "outputs/evaluation/metrics")
    assert len(metrics) == 6  # one file per FM x task
    try:
        proc = sh(["dvc", "repro", "-f", "-s", "evaluate"], repo, check=False, env=env)
        assert proc.returncode != 0
        assert "retfm relink" in proc.stderr + proc.stdout, (proc.stdout + proc.stderr)[-3000:]
        # the failed stage kept the git-tracked metrics (persist: true): DVC cannot restore them
        assert _tree(repo / "outputs/evaluation/metrics") == metrics
        doctor = sh(["retfm", "doctor"], repo, check=False, env=env)
        assert doctor.returncode == 1 and "retfm relink" in doctor.stdout, doctor.stdout
    finally:
        sh(["dvc", "checkout", "-q"], repo)  # the cached outs DVC removed before the stage ran
    assert "all records agree" in sh(["retfm", "doctor"], repo).stdout


def test_the_readme_grid_line_runs_every_adapt_stage_in_parallel(colleague, sh) -> None:  # noqa: ANN001
    """On the colleague's copy: the rerun adaptations register new classifier versions."""
    repo = colleague[0]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = re.search(r"^\s*(dvc stage list --name-only \| grep '\^adapt@' \| xargs .*)$",
                     readme, re.M).group(1)  # fmt: skip
    params = repo / "params.yaml"
    epochs = yaml.safe_load(params.read_text())["adapt"]["epochs"]
    apply_overrides(params, {"adapt": {"epochs": epochs - 1}})  # every adapt stage stale at once
    proc = sh(["bash", "-c", line], repo)
    ran = re.findall(r"Running stage '(adapt@[^']+)'", proc.stdout + proc.stderr)
    assert len(ran) == 12, proc.stdout[-3000:]  # 2 FMs x 2 runs x 3 tasks
    status = sh(["dvc", "status"], repo).stdout
    assert "adapt@" not in status and "evaluate:" in status, status  # dvc.lock consistent


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.json"))}


def test_adding_a_replicate_reruns_only_its_stages(records, sh) -> None:  # noqa: ANN001
    """study.replicates 2 -> 3: the new replicate's stages and the study-wide ones downstream
    (evaluate, compare) would run; no stage of replicates r0 / r1 is stale."""
    params = records.path / "params.yaml"
    original = params.read_text()
    try:
        apply_overrides(params, {"study": {"replicates": 3}})  # rewrites `expanded` too
        assert "mae-hospital-r2:" in params.read_text()
        status = json.loads(sh(["dvc", "status", "--json"], records.path).stdout)
        would = {k for k in status if not k.endswith(".dvc")}  # what `dvc repro` would run
        new = {f"{kind}@{site}-r2" for kind in ("cohort", "pack_cohort")
               for site in ("hospital", "screening")}  # fmt: skip
        new |= {f"{kind}@mae-{site}-r2" for kind in ("pretrain", "register")
                for site in ("hospital", "screening")}  # fmt: skip
        new |= {f"adapt@mae-{site}-r2-{task}" for site in ("hospital", "screening")
                for task in ("hospital_dr", "screening_dr", "public_dr")}  # fmt: skip
        assert would == new | {"evaluate", "compare"}, sorted(
            would ^ (new | {"evaluate", "compare"})
        )
    finally:
        params.write_text(original)
    assert "up to date" in sh(["dvc", "status"], records.path).stdout
