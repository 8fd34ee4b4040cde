"""The study against a team MLflow server: PostgreSQL backend, S3 artifacts via its proxy.

Every check runs in a separate process that knows only the tracking URI (no database, no S3
keys), as a colleague's laptop would. The load test has eight processes log at once and counts
every metric back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.services, pytest.mark.xdist_group("study")]

SITES = ("hospital", "screening")
N_JOBS, N_KEYS, N_STEPS = 8, 5, 100  # 500 metric values per job
ADMIN_PASSWORD = "retfm-test-admin-7Qx"  # noqa: S105 - a throwaway server on loopback

CHECK = textwrap.dedent(
    """
    import json, os, tempfile
    from pathlib import Path
    import mlflow, numpy as np
    from mlflow.tracking import MlflowClient

    assert "AWS_SECRET_ACCESS_KEY" not in os.environ and "MLFLOW_S3_ENDPOINT_URL" not in os.environ
    client = MlflowClient()
    out = {"fms": {}, "adapt": [], "artifacts": {}}
    for site in ("hospital", "screening"):
        v = client.get_model_version_by_alias(f"fm-mae-{site}-r0", "candidate")
        out["fms"][site] = {"version": v.version, "source": v.source, "site": v.tags["fm.site"]}
    adapt = client.get_experiment_by_name("adapt")
    for r in client.search_runs([adapt.experiment_id], "tags.stage = 'adapt'", max_results=500):
        out["adapt"].append({"fm": r.data.tags["fm.run"], "task": r.data.tags["task"],
                             "seed": r.data.tags["seed"], "auroc": r.data.metrics.get("auroc")})
    tmp = Path(tempfile.mkdtemp())
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/fm-mae-hospital-r0@candidate",
                                                         dst_path=str(tmp / "model")))
    out["artifacts"]["onnx"] = sorted(p.name for p in model_dir.rglob("*.onnx"))
    study = client.get_experiment_by_name("study")
    run = client.search_runs([study.experiment_id], "tags.stage = 'compare'", max_results=1)[0]
    report = Path(client.download_artifacts(run.info.run_id, "report.html", str(tmp)))
    out["artifacts"]["report_bytes"] = report.stat().st_size
    out["artifacts"]["report_head"] = report.read_text()[:200]
    model = mlflow.pyfunc.load_model("models:/fm-mae-hospital-r0@candidate")
    img = int(model.metadata.metadata["preprocessing"]["img_size"])
    pred = model.predict(np.zeros((2, 3, img, img), dtype=np.float32))
    feats = next(iter(pred.values())) if isinstance(pred, dict) else np.asarray(pred)
    out["predict"] = {"shape": list(feats.shape), "finite": bool(np.isfinite(feats).all())}
    print(json.dumps(out))
    """
)

JOB = textwrap.dedent(
    """
    import sys, tempfile, time
    from pathlib import Path
    import mlflow
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    job, n_keys, n_steps = (int(a) for a in sys.argv[1:4])
    start_at = float(sys.argv[4])
    client = MlflowClient()
    exp = client.get_experiment_by_name("load")
    exp_id = exp.experiment_id if exp else None
    if exp_id is None:
        try:
            exp_id = client.create_experiment("load")
        except Exception:
            exp_id = client.get_experiment_by_name("load").experiment_id
    run = client.create_run(exp_id, run_name=f"eval-{job}", tags={"load.job": str(job)})
    rid = run.info.run_id
    while time.time() < start_at:
        time.sleep(0.01)
    t0 = time.time()
    client.log_batch(rid, params=[Param("job", str(job)), Param("keys", str(n_keys))])
    for step in range(0, n_steps, 20):  # one batch = 20 steps x n_keys metrics
        ms = [Metric(f"auroc/group{k}", job + k / 10 + s / 1e4, int(time.time() * 1000), s)
              for s in range(step, min(step + 20, n_steps)) for k in range(n_keys)]
        client.log_batch(rid, metrics=ms)
    art = Path(tempfile.mkdtemp()) / "groups.json"
    art.write_text('{"job": %d}' % job)
    client.log_artifact(rid, str(art))
    client.set_terminated(rid)
    print(rid, round(time.time() - t0, 3))
    """
)


@pytest.fixture(scope="module")
def server(team_services):  # noqa: ANN201 - MlflowServer
    return team_services[2]


def client_env(uri: str) -> dict[str, str]:
    """What a colleague has: the tracking URI, and no S3 or database credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
    env["MLFLOW_TRACKING_URI"] = uri
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def test_a_study_made_on_the_embedded_store_moves_onto_the_server(
    team_study, pristine_study, server, sh
) -> None:  # noqa: ANN001
    """``retfm relink`` (README, Team setup): nothing retrained, every record unchanged."""
    out = team_study.repro.stdout
    assert "pretrain@mae-hospital-r0: recorded from its outputs (not retrained)" in out, out
    assert "adapt@mae-screening-r0-public_dr: rerunning against " + server.uri in out, out
    # every tracked stage was rerun (--force) against the server: outputs byte-identical
    lock = (pristine_study.path / "dvc.lock").read_bytes()
    assert (team_study.path / "dvc.lock").read_bytes() == lock
    env = {"MLFLOW_TRACKING_URI": server.uri}
    assert "all records agree" in sh(["retfm", "doctor"], team_study.path, env=env).stdout
    assert "up to date" in sh(["dvc", "status"], team_study.path).stdout


def test_study_over_http_is_complete_for_a_second_process(team_study, server, tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=tmp_path,
        env=client_env(server.uri),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {s: got["fms"][s]["site"] for s in SITES} == {s: s for s in SITES}
    assert all(got["fms"][s]["source"].startswith(("models:/", "mlflow-artifacts:")) for s in SITES)
    combos = {(r["fm"], r["task"], r["seed"]) for r in got["adapt"]}
    # sites x 2 pre-training runs each x 3 tasks x 2 seeds
    assert len(got["adapt"]) == len(combos) == len(SITES) * 2 * 3 * 2, got["adapt"]
    assert all(r["auroc"] is not None and 0.0 <= r["auroc"] <= 1.0 for r in got["adapt"])
    assert got["artifacts"]["onnx"], got["artifacts"]
    assert got["artifacts"]["report_bytes"] > 1000
    assert "<html" in got["artifacts"]["report_head"].lower()
    assert got["predict"]["shape"][0] == 2 and got["predict"]["finite"]


def test_state_lives_in_postgres_and_s3(team_study, team_services) -> None:
    """Runs and registry rows are in PostgreSQL; artifact bytes are in the S3 bucket."""
    import psycopg2

    s3, pg, _ = team_services
    with (
        psycopg2.connect(
            host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname=pg.dbname
        ) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("select count(*) from runs")
        n_runs = cur.fetchone()[0]
        cur.execute("select name from registered_models order by name")
        models = [r[0] for r in cur.fetchall()]
    assert n_runs >= len(SITES) * 3 * 2 and {"fm-mae-hospital-r0", "fm-mae-screening-r0"} <= set(
        models
    )
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket="mlflow")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert any(k.endswith(".onnx") for k in keys), keys[:20]
    assert any(k.endswith("report.html") for k in keys), keys[:20]


def test_eight_parallel_jobs_lose_no_metric(server, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    start_at = time.time() + 8  # every job has created its run and waits for the same moment
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", JOB, str(j), str(N_KEYS), str(N_STEPS), str(start_at)],
            cwd=tmp_path,
            env=client_env(server.uri),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for j in range(N_JOBS)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    wall = time.time() - start_at
    for p, (_out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    times = [float(out.strip().splitlines()[-1].split()[1]) for out, _ in results]
    print(f"{N_JOBS} jobs x {N_KEYS * N_STEPS} metrics: wall {wall:.1f} s, per job {times}")

    client = MlflowClient(server.uri, server.uri)
    exp = client.get_experiment_by_name("load")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert len(runs) == N_JOBS
    total = 0
    for r in runs:
        job = int(r.data.params["job"])
        assert r.info.status == "FINISHED"
        for k in range(N_KEYS):
            history = client.get_metric_history(r.info.run_id, f"auroc/group{k}")
            assert sorted(m.step for m in history) == list(range(N_STEPS))
            assert {round(m.value - job - k / 10 - m.step / 1e4, 9) for m in history} == {0.0}
            total += len(history)
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["groups.json"]
    assert total == N_JOBS * N_KEYS * N_STEPS


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout_s: float) -> tuple[str, str]:
    """Read the command's stdout until a line starts with ``prefix``; (line, all read)."""
    import queue
    import threading

    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen, deadline = "", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen += line
        if line.startswith(prefix):
            return line.strip(), seen
    raise AssertionError(f"no {prefix!r} line (rc={proc.poll()}):\n{seen}")


def _follow_first_day_lines(lines: list[str], tmp_path: Path) -> None:
    """The printed ``dvc remote`` lines, pasted into a project: push, then a second clone
    (which gets .dvc/config from git and pastes only the ``--local`` credential lines) pulls."""
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def sh(cmd: str, cwd: Path) -> None:
        proc = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"

    first = tmp_path / "first"
    (first / "data").mkdir(parents=True)
    (first / "data" / "scan.txt").write_text("a fundus photograph, as far as DVC can tell\n")
    sh("git init -q && dvc init -q && dvc add -q data", first)
    for line in lines:
        sh(line, first)
    sh(f"{' '.join(git)} add -A && {' '.join(git)} commit -qm study", first)
    assert "secret" not in (first / ".dvc/config").read_text()  # keys stay in config.local
    sh("dvc push", first)
    sh(f"git clone -q {first} second", tmp_path)
    second = tmp_path / "second"
    for line in lines:
        if "--local" in line:
            sh(line, second)
    sh("dvc pull", second)
    assert (second / "data" / "scan.txt").read_text() == (first / "data/scan.txt").read_text()


def test_retfm_server_local_with_basic_auth(tmp_path) -> None:
    """``retfm server --local --basic-auth``: refuses anonymous clients, prints a first day's
    lines (tracking URI, a DVC remote on its own S3) that work as pasted, keeps its ports for
    the next start, stops every service."""
    import urllib.error
    import urllib.request

    from retfm.team import free_port, missing_binaries

    if missing_binaries():
        pytest.skip("; ".join(missing_binaries().values()))
    port = free_port()
    s3_port = free_port(also_free=(10000,))
    # PostgreSQL runs as `postgres` when root: its data folder must be reachable by that user
    workdir = Path(tempfile.mkdtemp(prefix="retfm-server-"))
    workdir.chmod(0o755)
    proc = subprocess.Popen(
        [
            *("retfm", "server", "--local", "--basic-auth", "--workers", "1"),
            *("--port", str(port), "--workdir", str(workdir / "state")),
            *("--s3-port", str(s3_port), "--pg-port", str(free_port())),
        ],
        cwd=tmp_path,
        env={
            **client_env("unused"),
            "PYTHONUNBUFFERED": "1",
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _, seen = _wait_for_line(proc, "dvc remote modify --local team secret_access_key", 240)
        line = next(x for x in seen.splitlines() if x.startswith("export MLFLOW_TRACKING_URI="))
        uri = line.split("=", 1)[1]
        assert uri == f"http://127.0.0.1:{port}"
        s3_endpoint = next(x.split()[1] for x in seen.splitlines() if x.startswith("S3: "))
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(search, timeout=10)  # noqa: S310 - loopback
        assert refused.value.code == 401
        env = {
            **client_env(uri),
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
        }
        code = "import mlflow; r = mlflow.start_run(); mlflow.log_metric('m', 1.0); print('ok')"
        logged = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert logged.returncode == 0 and "ok" in logged.stdout, logged.stderr[-3000:]
        assert (workdir / "state/postgres/data/PG_VERSION").is_file()  # kept for a restart
        stored = json.loads((workdir / "state/ports.json").read_text())
        assert stored["s3"] == s3_port and s3_endpoint == f"http://127.0.0.1:{s3_port}"
        pasted = [x.strip() for x in seen.splitlines() if x.startswith("dvc remote ")]
        assert len(pasted) >= 4, seen
        _follow_first_day_lines(pasted, tmp_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends
        proc.wait(60)
        shutil.rmtree(workdir, ignore_errors=True)
    import socket

    for endpoint in (uri, s3_endpoint):
        host, p = endpoint.removeprefix("http://").split(":")
        with socket.socket() as s:
            assert s.connect_ex((host, int(p))) != 0, f"{endpoint} still listening"
