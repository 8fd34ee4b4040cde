"""A fresh clone of this repository on the tiny profile, as a new user would have it.

The study repo is built once per session (copy of the files git would ship, new git repo, tiny
profile, synthetic data, ``dvc repro``); tests then look at it as a user would: the registry,
the runs, the outputs, the commands' output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from retfm.profiles import fresh_copy

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class Study:
    path: Path
    repro: subprocess.CompletedProcess

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.path / 'mlruns' / 'mlflow.db'}"


def run(
    cmd: list[str],
    cwd: Path,
    *,
    check: bool = True,
    timeout: int = 900,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.update(env or {})
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode})\nSTDOUT:\n{proc.stdout[-4000:]}\n"
            f"STDERR:\n{proc.stderr[-6000:]}"
        )
    return proc


def clone_repo(dest: Path, profile: str | None = "tiny") -> Path:
    """Copy what git ships into ``dest``, make it a git repo, apply the profile."""
    return fresh_copy(ROOT, dest, profile)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic raw data for the tiny profile, generated once and copied by each study."""
    repo = clone_repo(tmp_path_factory.mktemp("data-src"))
    run(["retfm", "synth"], repo)
    return repo / "data"


@pytest.fixture(scope="session")
def make_study(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Callable[..., Study]:
    def make(
        name: str,
        mutate: Callable[[Path], None] | None = None,
        *,
        check: bool = True,
        lanes: bool = False,
    ) -> Study:
        """``lanes``: build it as ``make demo`` does (``retfm repro --jobs 2``)."""
        repo = clone_repo(tmp_path_factory.mktemp(name))
        shutil.copytree(tiny_data, repo / "data")
        if mutate is not None:
            mutate(repo)
        run(["dvc", "add", "-q", "data"], repo)
        cmd = ["retfm", "repro", "--jobs", "2"] if lanes else ["dvc", "repro"]
        proc = run(cmd, repo, check=check)
        return Study(repo, proc)

    return make


def claim(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory, group: str) -> None:
    """Under ``--dist loadgroup`` one worker builds each group's session study: fail, naming
    the cause, when a second worker is about to build it again (pytest-xdist 3.8 ignores
    ``xdist_group`` under pytest 9.2, which silently doubled the suite's time)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None or not config.getvalue("loadgroup"):
        return
    marker = tmp_path_factory.getbasetemp().parent / f"group-{group}.worker"
    try:
        with marker.open("x") as fh:
            fh.write(worker)
    except FileExistsError:
        pytest.fail(
            f"xdist_group {group!r}: worker {marker.read_text()} already built this study and "
            f"{worker} was sent tests of the same group; this pytest / pytest-xdist pair "
            "ignores --dist loadgroup. Install the versions pyproject.toml allows "
            "(pip install -e '.[dev]')."
        )


@pytest.fixture(scope="session")
def study(make_study: Callable[..., Study], request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Study:  # fmt: skip
    """The tiny study, reproduced end to end (and a pristine copy: :func:`pristine_study`)."""
    claim(request.config, tmp_path_factory, "study")
    reuse = os.environ.get("RETFM_TEST_STUDY")  # developers: a tiny study built before
    if reuse:
        built = Study(Path(reuse), subprocess.CompletedProcess([], 0, "", ""))
    else:
        built = make_study("study", lanes=True)
    snapshot = tmp_path_factory.getbasetemp() / "study-snapshot" / "study"
    shutil.copytree(built.path, snapshot, symlinks=True)
    return built


@pytest.fixture(scope="session")
def pristine_study(study: Study, tmp_path_factory: pytest.TempPathFactory) -> Study:
    """The tiny study as ``dvc repro`` left it, never mutated by the tests that use ``study``,
    for tests that only copy it (the team tests, in the same xdist group: as their own group on
    the other worker they waited ~260 s for the build and competed for the 2 cores, and the
    suite took 1,350 s instead of 1,185 s)."""
    snapshot = tmp_path_factory.getbasetemp() / "study-snapshot" / "study"
    return Study(snapshot, study.repro)


@pytest.fixture(scope="session")
def four(tmp_path_factory, clone: Callable, sh: Callable, request):  # noqa: ANN001, ANN201
    """The four-FM study (tests/e2e/test_four_fms.py): stand-ins of the study's four released
    checkpoints imported with no pre-training site, on profiles/recovery.yaml's task sets."""
    from retfm.profiles import apply_overrides, apply_profile

    claim(request.config, tmp_path_factory, "four")
    tasks = ["hospital_dr", "screening_dr"]
    repo = clone(tmp_path_factory.mktemp("four-fms"), profile="recovery")
    out = sh(["retfm", "stand-in-checkpoints", "checkpoints"], repo)
    assert "NOT the released weights" in out.stdout
    apply_profile(repo / "params.yaml", repo / "profiles" / "four-fms.yaml")
    apply_overrides(repo / "params.yaml", {"study": {"sites": [], "tasks": tasks},
                                           "adapt": {"seeds": [0, 1]}})  # fmt: skip
    sh(["retfm", "synth"], repo)  # no site pools: only the downstream sets
    assert not (repo / "data" / "sites").exists()
    sh(["dvc", "add", "-q", "data"], repo)
    return Study(repo, sh(["dvc", "repro"], repo))


@pytest.fixture(scope="session")
def recipes(tmp_path_factory, tiny_data: Path, clone: Callable, sh: Callable, request):  # noqa: ANN001, ANN201
    """One MAE and one DINOv2 FM per site, all pre-trained here (tests/e2e/test_two_recipes.py):
    the tiny profile with profiles/two-recipes.yaml, on two of its tasks."""
    from retfm.profiles import apply_overrides, apply_profile

    claim(request.config, tmp_path_factory, "recipes")
    repo = clone(tmp_path_factory.mktemp("two-recipes"), profile="tiny")
    apply_profile(repo / "params.yaml", repo / "profiles" / "two-recipes.yaml")
    # one pre-training run per FM: the study with no replicates, whose data-level verdicts
    # must all read "undetermined (one pre-training run per site)"
    apply_overrides(
        repo / "params.yaml",
        {"study": {"tasks": ["hospital_dr", "screening_dr"], "replicates": 1}},
    )
    shutil.copytree(tiny_data, repo / "data")
    sh(["dvc", "add", "-q", "data"], repo)
    return Study(repo, sh(["dvc", "repro"], repo))


@pytest.fixture(scope="session")
def sh() -> Callable[..., subprocess.CompletedProcess]:
    """Run a command in a study repo with the project's venv on PATH."""
    return run


# --- team services (tests/e2e/test_team_*.py): real SeaweedFS S3, PostgreSQL, MLflow server ---


@pytest.fixture(scope="session")
def team_services(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - generator
    """SeaweedFS + PostgreSQL + ``mlflow server --serve-artifacts`` on loopback, once."""
    from retfm.team import missing_binaries, team_stack

    missing = missing_binaries()
    if missing:
        pytest.skip("team services unavailable: " + "; ".join(missing.values()))
    with team_stack(tmp_path_factory.mktemp("team-services")) as stack:
        yield stack


@pytest.fixture(scope="session")
def team_study(team_services, tmp_path_factory: pytest.TempPathFactory,
               pristine_study: Study) -> Study:  # fmt: skip
    """The finished tiny study moved onto the team's MLflow server, as the README says:
    a copy of the session's study (made on the embedded store, which the copy drops), pointed at
    the server and ``retfm relink``-ed; its state then committed to git. ``repro`` holds the
    relink's output."""
    server = team_services[2]
    env = {"MLFLOW_TRACKING_URI": server.uri}
    repo = tmp_path_factory.mktemp("team-study") / "study"
    shutil.copytree(pristine_study.path, repo, symlinks=True)
    shutil.rmtree(repo / "mlruns")  # nothing may still read the embedded store
    proc = run(["retfm", "relink"], repo, env=env)
    run(["git", "add", "-A"], repo)
    # metrics with ``cache: false`` live in git, but .gitignore ignores /outputs/ as a whole
    run(["git", "add", "-f", *uncached_outs(repo)], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "study"], repo)
    return Study(repo, proc)


def uncached_outs(repo: Path) -> list[str]:
    """The repo's ``cache: false`` outs (metrics), the ones git rather than DVC keeps."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return sorted(
            str(Path(out.fs_path).relative_to(repo))
            for stage in dvc_repo.index.stages
            for out in stage.outs
            if not out.use_cache
        )


@pytest.fixture(scope="session")
def clone() -> Callable[..., Path]:
    """``clone(dest, profile)``: a fresh copy of what git ships, as its own git repo."""
    return clone_repo
