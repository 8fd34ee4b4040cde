"""MLflow set-up shared by every stage: where the store is, experiments, lineage tags.

The embedded default is ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts``
(MLflow >= 3.13 refuses a plain ``./mlruns`` file store). ``MLFLOW_TRACKING_URI`` points every
stage at a team server instead; artifacts then go through the server's proxy.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from retfm.settings import Settings

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

EXPERIMENTS = ("pretrain", "adapt", "study")
#: Tag naming a run by what it computed (stage, inputs' content hashes, seed), never by a store's
#: id: stage outputs record keys, so they stay byte-identical when a stage is forced to rerun
#: and mean the same in any tracking store.
RUN_KEY = "retfm.key"


class RunNotInStoreError(LookupError):
    """The tracking store has no run for a key that a stage output records."""


def tracking_uri(settings: Settings) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or settings.tracking.uri


def _is_local(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


class StoreMovedError(RuntimeError):
    """The embedded store records its artifacts in another project folder (moved or copied)."""


#: Columns of MLflow's SQL schema that hold artifact locations (checked on MLflow 3.13-3.17).
ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def recorded_artifact_root(db: Path, artifacts: Path) -> Path | None:
    """Where the store's experiments keep artifacts, as the ``artifacts`` folder they were made
    under (None for an empty store, or one whose experiments live elsewhere on purpose)."""
    import sqlite3

    if not db.is_file():
        return None
    with sqlite3.connect(db) as con:
        try:
            rows = con.execute("select artifact_location from experiments").fetchall()
        except sqlite3.Error:
            return None
    suffix = f"/{artifacts.as_posix().strip('/')}/"
    for (location,) in rows:
        path = str(location).removeprefix("file://")
        if suffix in path:
            return Path(path[: path.index(suffix) + len(suffix) - 1])
    return None


def check_store_location(settings: Settings) -> None:
    """Refuse an embedded store whose artifacts live in another copy of the project.

    MLflow writes absolute artifact paths into its database. A moved project would then look
    for them where they no longer are, and a copied one would silently write into the
    original's folder; both are stopped here with the command that fixes it.
    """
    db = _sqlite_path(tracking_uri(settings))
    if db is None:
        return
    here = Path(settings.tracking.artifacts).resolve()
    recorded = recorded_artifact_root(db, Path(settings.tracking.artifacts))
    if recorded is None or recorded == here:
        return
    state = "still exists (a copy)" if recorded.exists() else "no longer exists (moved)"
    raise StoreMovedError(
        f"the MLflow store {db} records its artifacts in {recorded}, which {state}, not in "
        f"this project's {here}. Run `retfm relocate` to point the store at this project "
        "(the database is backed up first)"
    )


def relocate_store(settings: Settings) -> tuple[Path, Path, int]:
    """Rewrite the embedded store's artifact locations from the recorded project folder to this
    one; returns (old root, new root, rows changed). The database is copied to
    ``mlflow.db.bak`` first."""
    import shutil
    import sqlite3

    db = _sqlite_path(tracking_uri(settings))
    if db is None:
        raise ValueError(f"relocate: {tracking_uri(settings)} is not an embedded SQLite store")
    here = Path(settings.tracking.artifacts).resolve()
    old = recorded_artifact_root(db, Path(settings.tracking.artifacts))
    if old is None or old == here:
        return here, here, 0
    old_root, new_root = old.parent.parent, here.parent.parent  # the project folders
    shutil.copyfile(db, db.with_suffix(db.suffix + ".bak"))
    changed = 0
    with sqlite3.connect(db) as con:
        for table, column in ARTIFACT_COLUMNS:
            for prefix in ("file://", ""):
                cur = con.execute(
                    f"update {table} set {column} = ? || substr({column}, ?) "  # noqa: S608
                    f"where {column} like ?",
                    (f"{prefix}{new_root}", len(f"{prefix}{old_root}") + 1,
                     f"{prefix}{old_root}/%"),
                )  # fmt: skip
                changed += cur.rowcount
    return old, here, changed


def configure(settings: Settings) -> MlflowClient:
    """Point MLflow at the project's store (creating ``mlruns/`` for the embedded one)."""
    uri = tracking_uri(settings)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        check_store_location(settings)
        # absolute, because MLflow caches one store per URI string for the whole process
        uri = f"sqlite:///{db.resolve()}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


#: The MLflow UI opens an experiment in its GenAI layout (traces, token usage) unless the
#: experiment says it is model development; every retfm experiment does.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: The UI's page for comparing runs, in its model-training layout.
UI_PATH = "/#/experiments?workflowType=machine_learning"


def experiment_id(settings: Settings, name: str) -> str:
    """Get or create an experiment (tagged as model development, so the UI shows runs, not
    traces); local stores keep artifacts under ``tracking.artifacts``."""
    client = configure(settings)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") is None:
            client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id
    location = None
    if _is_local(tracking_uri(settings)):
        location = (Path(settings.tracking.artifacts).resolve() / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:  # created concurrently by a parallel stage
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def log_dataset(
    meta: pd.DataFrame,
    *,
    name: str,
    source: str,
    digest: str,
    context: str,
    targets: str | None = None,
) -> None:
    """Record in the active run which data it read (MLflow's dataset tracking: the Datasets
    column of the runs table and the run's Inputs): the table's name, where it lives (the DVC
    output path), its content digest and its schema and size, never its rows."""
    import warnings

    from mlflow.data.pandas_dataset import from_pandas

    with warnings.catch_warnings():
        # a DVC path resolves to MLflow's two local-artifact sources alike (same class name),
        # and the schema hint about integer columns concerns model inputs, not a cohort table
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        dataset = from_pandas(
            meta.reset_index(drop=True), source=source, name=name, digest=digest[:16],
            targets=targets if targets in meta.columns else None,
        )  # fmt: skip
    mlflow.log_input(dataset, context=context)


def git_commit(root: Path = Path(".")) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_hash(dvc_file: Path) -> str:
    """The md5 DVC recorded for the first out of a ``.dvc`` file (e.g. ``data.dvc``)."""
    if not dvc_file.is_file():
        return "untracked"
    raw = yaml.safe_load(dvc_file.read_text()) or {}
    outs = raw.get("outs") or [{}]
    return str(outs[0].get("md5", "untracked"))


def lock_hash(stage: str, path: str, lock_file: Path = Path("dvc.lock")) -> str:
    """The md5 that ``dvc.lock`` holds for an out of a stage (the data a model actually saw).

    ``dvc.lock`` is written after a stage finishes, so a later stage reads its upstream's hash.
    """
    if not lock_file.is_file():
        return "unlocked"
    raw = yaml.safe_load(lock_file.read_text()) or {}
    for out in (raw.get("stages", {}).get(stage) or {}).get("outs", []):
        if out.get("path") == path:
            return str(out.get("md5", "unlocked"))
    return "unlocked"


def base_tags(settings: Settings) -> dict[str, str]:
    """Tags every run carries (DESIGN.md naming)."""
    return {
        "study": settings.study.name,
        "data.md5": dvc_hash(Path("data.dvc")),
        "git.commit": git_commit(),
        "params.hash": settings.digest(),
        "profile": settings.profile,
    }


def find_run(client: MlflowClient, exp_id: str, tags: dict[str, str]) -> str | None:
    """The newest live run whose tags all match, or None."""
    filt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs(
        [exp_id], filter_string=filt, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0].info.run_id if runs else None


def run_key(*parts: object) -> str:
    """A run's key: its stage and the content hashes and settings that determine it."""
    return "/".join(str(p) for p in parts)


def keyed_run_id(settings: Settings, experiment: str, key: str) -> str:
    """The newest run recorded with ``key``; a clear error naming the store when there is none
    (the outputs were made against another tracking store, or its runs were deleted)."""
    client = configure(settings)
    exp = client.get_experiment_by_name(experiment)
    found = find_run(client, exp.experiment_id, {RUN_KEY: key}) if exp is not None else None
    if found is None:
        raise RunNotInStoreError(
            f"the tracking store {tracking_uri(settings)} has no {experiment!r} run with key "
            f"{key!r}: these outputs were recorded in another store (or its runs were deleted). "
            "Point MLFLOW_TRACKING_URI at the store that made them, or record them in this one "
            "with `retfm relink` (see the README, Team setup)"
        )
    return found


@contextmanager
def run(
    settings: Settings,
    experiment: str,
    *,
    name: str,
    tags: dict[str, str],
    run_id: str | None = None,
    parent_run_id: str | None = None,
    key: str | None = None,
    started: float | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume, when ``run_id`` is given) a run with the base tags (and ``key``).

    ``started`` (seconds since the epoch) back-dates a new run to when the stage's work began,
    for stages that open their run only at the end, so that MLflow shows their real duration.
    """
    exp = experiment_id(settings, experiment)
    all_tags = {**base_tags(settings), **tags, **({RUN_KEY: key} if key else {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if started is not None and run_id is None:
        created = MlflowClient().create_run(
            exp, start_time=int(started * 1000), tags=all_tags, run_name=name
        )
        run_id = created.info.run_id
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else exp,
        run_name=None if run_id else name,
        tags=None if run_id else all_tags,
    ) as active:
        if run_id:
            mlflow.set_tags(all_tags)
        yield active


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


class BufferedMetricLogger:
    """Sends metrics from a background thread so that training never waits on the server.

    If the tracking server is unreachable, metrics stay queued and are retried with back-off;
    ``close()`` makes a last bounded attempt and reports what could not be sent.
    """

    def __init__(self, client: MlflowClient, run_id: str, *, retry_s: float = 2.0) -> None:
        self.client, self.run_id, self.retry_s = client, run_id, retry_s
        self._queue: queue.Queue[Metric | None] = queue.Queue()
        self._pending: list[Metric] = []
        self.sent = 0
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self._queue.put(Metric(key, float(value), now, int(step)))

    def _flush(self) -> bool:
        while self._pending:
            batch = self._pending[:1000]
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception as err:  # noqa: BLE001 - any transport error means "retry later"
                log.warning(
                    "tracking server unavailable (%s); %d metrics queued",
                    type(err).__name__,
                    len(self._pending),
                )
                return False
            del self._pending[: len(batch)]
            self.sent += len(batch)
        return True

    def _loop(self) -> None:
        stop = False
        while not stop:
            try:
                item = self._queue.get(timeout=self.retry_s)
                while True:
                    if item is None:
                        stop = True
                    else:
                        self._pending.append(item)
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            if not self._flush() and not stop:
                time.sleep(self.retry_s)

    def close(self, timeout_s: float = 60.0) -> int:
        """Stop the sender; returns how many metrics could not be delivered."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline and not self._flush():
            time.sleep(self.retry_s)
        if self._pending:
            log.error("%d metrics could not be sent to run %s", len(self._pending), self.run_id)
        return len(self._pending)


def study_parent_run(settings: Settings, experiment: str = "adapt") -> str:
    """The one parent run that groups every adaptation of this study version, keyed by the
    study name plus a hash of params and raw data. The replicate count is not part of the key:
    a replicate added later joins the runs of the ones it adds to."""
    data = settings.model_dump(mode="json", exclude={"expanded": True,
                                                    "study": {"replicates"}})  # fmt: skip
    blob = json.dumps(data, sort_keys=True)
    key = f"{hash_text(blob)}-{dvc_hash(Path('data.dvc'))[:12]}"
    return parent_run(settings, experiment, "study-parent", key, f"study-{settings.study.name}")


def parent_run(
    settings: Settings,
    experiment: str,
    kind: str,
    key: str,
    name: str,
    tags: dict[str, str] | None = None,
) -> str:
    """The run of ``kind`` keyed by ``key`` that groups child runs (an FM's replicates, a
    study's adaptations), found or created under a file lock so that parallel jobs share one."""
    from filelock import FileLock

    client = configure(settings)
    exp = experiment_id(settings, experiment)
    lock_name = f"retfm-parent-{hash_text(tracking_uri(settings) + kind + key)}.lock"
    with FileLock(str(Path(tempfile.gettempdir()) / lock_name), timeout=120):
        found = find_run(client, exp, {"study.key": key, "run.kind": kind})
        if found:
            return found
        all_tags = {**base_tags(settings), **(tags or {}), "study.key": key, "run.kind": kind}
        created = client.create_run(exp, run_name=name, tags=all_tags)
        return created.info.run_id


def hash_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]
