"""A team shares one study through a DVC S3 remote (a real SeaweedFS on loopback).

One member reproduces the study and pushes; another clones the git state and pulls, and has
every output, byte for byte, without running a stage. A push cut off half-way is finished by
the next push; an object corrupted in the remote is refused on pull (with ``verify true``).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.services, pytest.mark.xdist_group("study")]

GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


#: Below outputs/, what is not a DVC output and so never travels: the Data Docs (HTML views
#: with run times, rebuilt by each run; logged to MLflow).
LOCAL_ONLY = ("docs/",)


def tree_md5(root: Path) -> dict[str, str]:
    """{relative path: md5} of every file below ``root`` (outputs' local-only views left out)."""
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()  # noqa: S324
        for p in sorted(root.rglob("*"))
        if p.is_file() and not str(p.relative_to(root)).startswith(LOCAL_ONLY)
    }


def add_remote(
    sh, repo: Path, s3, name: str, url: str, *, default: bool = False, verify: bool = True
) -> None:
    """URL, endpoint and ``verify`` go in .dvc/config (shared); keys in config.local only."""
    sh(["dvc", "remote", "add", *(["-d"] if default else []), "-f", name, url], repo)
    sh(["dvc", "remote", "modify", name, "endpointurl", s3.endpoint], repo)
    sh(["dvc", "remote", "modify", name, "verify", str(verify).lower()], repo)
    set_credentials(sh, repo, s3, name)


def set_credentials(sh, repo: Path, s3, name: str) -> None:
    sh(["dvc", "remote", "modify", "--local", name, "access_key_id", s3.access_key], repo)
    sh(["dvc", "remote", "modify", "--local", name, "secret_access_key", s3.secret_key], repo)


BUCKET = "dvc"  # one bucket, one prefix per remote (each bucket costs SeaweedFS volumes)


def remote_url(s3, prefix: str) -> str:
    client = s3.client()
    try:
        client.head_bucket(Bucket=BUCKET)
    except Exception:  # noqa: BLE001 - not there yet
        client.create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}/{prefix}"


def object_keys(s3, prefix: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def shared(team_study, team_services, sh):  # noqa: ANN201 - (repo, s3)
    """The study pushed to the team remote, with the remote committed (not its keys)."""
    s3 = team_services[0]
    repo = team_study.path
    add_remote(sh, repo, s3, "team", remote_url(s3, "team"), default=True)
    sh([*GIT, "commit", "-qm", "team remote", ".dvc/config"], repo)
    start = time.perf_counter()
    pushed = sh(["dvc", "push"], repo)
    print(f"dvc push: {time.perf_counter() - start:.1f} s; {pushed.stdout.strip()[-200:]}")
    return repo, s3


def fresh_clone(sh, repo: Path, dest: Path, s3) -> Path:
    """What a second team member does: git clone, then their own keys in config.local."""
    sh(["git", "clone", "-q", str(repo), str(dest)], repo.parent)
    set_credentials(sh, dest, s3, "team")
    return dest


def test_credentials_stay_out_of_git(shared, sh) -> None:
    repo, s3 = shared
    committed = sh(["git", "show", "HEAD:.dvc/config"], repo).stdout
    assert s3.endpoint in committed and "verify = true" in committed, committed
    assert s3.secret_key not in committed and s3.access_key not in committed
    assert s3.secret_key in (repo / ".dvc/config.local").read_text()
    sh(["git", "check-ignore", "-q", ".dvc/config.local"], repo)  # fails if not ignored
    tracked = sh(["git", "ls-files"], repo).stdout
    assert ".dvc/config.local" not in tracked


def test_clone_pulls_every_output_without_running_a_stage(shared, sh, tmp_path: Path) -> None:
    repo, s3 = shared
    clone = fresh_clone(sh, repo, tmp_path / "member-b", s3)
    assert not (clone / "outputs/adapt").exists() and not (clone / "data").exists()
    start = time.perf_counter()
    sh(["dvc", "pull"], clone)
    print(f"dvc pull: {time.perf_counter() - start:.1f} s")
    status = sh(["dvc", "status"], clone).stdout
    assert "up to date" in status, status
    for folder in ("outputs", "data"):
        theirs, ours = tree_md5(repo / folder), tree_md5(clone / folder)
        assert len(ours) > 10 and ours == theirs, set(ours.items()) ^ set(theirs.items())
    again = sh(["dvc", "repro"], clone)
    assert "Running stage" not in again.stdout, again.stdout


def test_interrupted_push_is_completed_by_the_next(shared, sh, tmp_path: Path) -> None:
    repo, s3 = shared
    name, url = "cut/", remote_url(s3, "cut")
    add_remote(sh, repo, s3, "cut", url)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    push = subprocess.Popen(
        ["dvc", "push", "-r", "cut", "--jobs", "1"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(object_keys(s3, name)) < 20 and push.poll() is None:
            assert time.monotonic() < deadline, "push uploaded nothing in 120 s"
            time.sleep(0.2)
    finally:
        if push.poll() is None:
            os.killpg(push.pid, signal.SIGKILL)
        push.wait(30)
    assert push.returncode == -signal.SIGKILL, "push finished before it could be cut off"
    partial = len(object_keys(s3, name))
    print(f"objects in the remote after the cut: {partial}")

    sh(["dvc", "push", "-r", "cut"], repo)
    complete = object_keys(s3, name)
    assert len(complete) > partial
    assert "in sync" in sh(["dvc", "status", "-c", "-r", "cut"], repo).stdout

    clone = fresh_clone(sh, repo, tmp_path / "member-c", s3)
    add_remote(sh, clone, s3, "cut", url)
    sh(["dvc", "pull", "-r", "cut"], clone)
    assert tree_md5(clone / "outputs") == tree_md5(repo / "outputs")
    print(f"objects in the remote after the second push: {len(complete)}")


def _lock_md5(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


@pytest.mark.parametrize("verify", [True, False])
def test_corrupted_object_in_the_remote(shared, sh, tmp_path: Path, verify: bool) -> None:
    """``verify true`` refuses it; without it DVC 3 trusts the remote (why we commit verify)."""
    repo, s3 = shared
    name = f"corrupt-{str(verify).lower()}"
    url = remote_url(s3, name)
    target, out = "pretrain@mae-hospital-r0", "outputs/pretrain/mae-hospital-r0/run.json"
    add_remote(sh, repo, s3, "bad", url)
    sh(["dvc", "push", "-r", "bad", target], repo)
    md5 = _lock_md5(repo, "pretrain@mae-hospital-r0", out)
    key = f"{name}/files/md5/{md5[:2]}/{md5[2:]}"
    assert key in object_keys(s3, name)
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=b'{"tampered": true}\n')

    clone = fresh_clone(sh, repo, tmp_path / "member-d", s3)
    add_remote(sh, clone, s3, "bad", url, verify=verify)
    landed = clone / out
    assert not landed.exists(), "outputs must come from the remote, not from git"
    proc = sh(["dvc", "pull", "-r", "bad", target], clone, check=False)
    if verify:
        assert proc.returncode != 0, proc.stdout
        assert out in proc.stderr, proc.stderr
        assert not landed.exists(), landed.read_text()
        assert not any((clone / ".dvc/cache").rglob(md5[2:])), "corrupt object cached"
    else:
        assert proc.returncode == 0, proc.stderr
        assert landed.read_bytes() == b'{"tampered": true}\n'
        assert hashlib.md5(landed.read_bytes()).hexdigest() != md5  # noqa: S324
