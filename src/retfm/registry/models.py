"""Register ONNX models (site FMs, task classifiers) with their lineage, idempotently.

A version is identified by the content hash of its PyTorch weights: re-running an unchanged pipeline
finds the existing version and only re-points the ``candidate`` alias, so no new version appears.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from retfm.registry.lineage import sha256_file, weights_digest

log = logging.getLogger(__name__)

PARITY_LIMIT = 1e-4
CANDIDATE = "candidate"
CHAMPION = "champion"


class RegistrationError(RuntimeError):
    """A model may not be registered (e.g. ONNX does not match PyTorch)."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    uri: str
    run_id: str
    parity: float
    weights_sha256: str
    created: bool
    weights_content: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def find_version(client: MlflowClient, name: str, weights_content: str) -> str | None:
    """The existing version of ``name`` built from exactly these weights, if any (matched on
    :func:`weights_digest`, not the file's sha256, which changes with header order)."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    for mv in versions:
        if mv.tags.get("weights.content") == weights_content:
            return str(mv.version)
    return None


def register_onnx(
    client: MlflowClient,
    *,
    name: str,
    onnx_path: Path,
    weights_path: Path,
    run_id: str,
    parity: float,
    input_example: np.ndarray,
    output_example: np.ndarray,
    metadata: dict,
    tags: dict[str, str],
    attachments: dict[str, str],
    description: str,
    model_description: str = "",
) -> Registration:
    """Log the ONNX model (+ weights and cards) into ``run_id`` and register it as ``name``.

    ``attachments`` maps a file name inside the model version to its text (cards); the
    safetensors weights travel in the same version so it can be fine-tuned further.
    ``description`` is the version's, ``model_description`` the registered model's (what
    the model is, across its versions; set on every call).
    """
    if not np.isfinite(parity) or parity > PARITY_LIMIT:
        raise RegistrationError(
            f"{name}: ONNX Runtime differs from PyTorch by {parity:.3g} (limit {PARITY_LIMIT:g}); "
            "not registered"
        )
    weights_sha = sha256_file(weights_path)
    content = weights_digest(weights_path)
    existing = find_version(client, name, content)
    if existing is not None:
        log.info("%s: weights unchanged, reusing version %s", name, existing)
        _describe_model(client, name, model_description)
        client.set_registered_model_alias(name, CANDIDATE, existing)
        uri = f"models:/{name}/{existing}"
        return Registration(name, existing, uri, run_id, parity, weights_sha, False, content)

    with tempfile.TemporaryDirectory() as tmp:
        extra = [str(weights_path)]
        for fname, text in attachments.items():
            path = Path(tmp) / fname
            path.write_text(text)
            extra.append(str(path))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)),
                name=name,
                registered_model_name=name,
                signature=infer_signature(input_example, output_example),
                input_example=input_example,
                metadata=metadata,
                extra_files=extra,
                save_as_external_data=False,
                # An ONNX graph needs only these to run; stating them skips MLflow's inference
                # of requirements, a subprocess that re-imports the caller (~3 s per version).
                pip_requirements=[
                    *mlflow.onnx.get_default_pip_requirements(),
                    f"numpy=={np.__version__}",
                ],
            )
            mlflow.log_metric(f"onnx_parity_max_abs/{name}", parity)
    version = str(info.registered_model_version)
    all_tags = {
        **tags,
        "weights.sha256": weights_sha,
        "weights.content": content,
        "onnx.parity": f"{parity:.3g}",
        "onnx.opset": str(_opset(onnx_path)),
    }
    for key, value in all_tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.update_model_version(name, version, description=description)
    _describe_model(client, name, model_description)
    client.set_registered_model_alias(name, CANDIDATE, version)
    return Registration(
        name, version, f"models:/{name}/{version}", run_id, parity, weights_sha, True, content
    )


#: What every registered model's description ends with: how its versions and aliases work.
ALIASES_NOTE = (
    "One version per distinct weights (an unchanged rerun reuses its version). Aliases: "
    f"`{CANDIDATE}` is the latest registered by the pipeline, `{CHAMPION}` the one promoted by "
    "`retfm promote` (the gates and their record are in the promotion runs); `retfm rollback` "
    "moves the champion back."
)


def _describe_model(client: MlflowClient, name: str, text: str) -> None:
    if not text:
        return
    full = f"{text}\n\n{ALIASES_NOTE}"
    if (client.get_registered_model(name).description or "") != full:
        client.update_registered_model(name, description=full)


def logged_model_id(version) -> str:  # noqa: ANN001 - mlflow ModelVersion
    """The id of the logged model behind a registry version. MLflow 3.17's SQL registry leaves
    ``ModelVersion.model_id`` empty for versions made by ``log_model(registered_model_name=)``;
    their source is ``models:/<model id>``."""
    return version.model_id or str(version.source).rsplit("/", 1)[-1]


def _opset(onnx_path: Path) -> int:
    model = onnx.load(str(onnx_path), load_external_data=False)
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def version_tags(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    return dict(client.get_model_version(name, version).tags)


#: What a stage output records of a registration: the model, not the store. The version
#: number, its URI and the run id belong to one tracking store (another store numbers
#: versions its own way) and ``created`` to one execution; recording them would make an
#: unchanged rerun, or the same study on a team server, look like changed outputs to DVC.
RECORDED = ("name", "parity", "weights_sha256", "weights_content")


def write_registration(path: Path, reg: Registration) -> None:
    """The stage's record of a registered version (see :data:`RECORDED`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in reg.to_dict().items() if k in RECORDED}
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def recorded_version(client: MlflowClient, record: dict) -> str:
    """The version of ``record["name"]`` (from :func:`write_registration`) holding its weights,
    in the current store; a clear error when this store does not have it."""
    version = find_version(client, record["name"], record["weights_content"])
    if version is None:
        raise RegistrationError(
            f"{record['name']}: the model registry at {mlflow.get_registry_uri()} has no version "
            f"with these weights (content {record['weights_content'][:12]}...): the study was "
            "registered in another store. Run `retfm relink` to register it in this one."
        )
    return version
