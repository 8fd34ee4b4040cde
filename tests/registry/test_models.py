"""Registration of real ONNX models in a real (temporary, sqlite) MLflow registry: the parity
gate, idempotence by weights, lineage tags, and everything a version carries with it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from retfm.fms import FM, Replicate
from retfm.models.encoder import Preprocessing, build_encoder, encode, save_encoder
from retfm.models.onnx_export import export_onnx, onnx_parity
from retfm.registry.lineage import REQUIRED_TAGS, model_card, sha256_file, weights_digest
from retfm.registry.models import CANDIDATE, Registration, RegistrationError, register_onnx
from retfm.settings import ModelPreset

ARCH = ModelPreset(
    img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
    decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2,
)  # fmt: skip
PREP = Preprocessing(img_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
LINEAGE = {
    "data.md5": "d" * 32,
    "cohort.md5": "c" * 32,
    "git.commit": "a" * 40,
    "params.hash": "p" * 16,
    "recipe": "mae-test",
    "recipe.hash": "r" * 16,
    "fm.site": "hospital",
}


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow sqlite store (migrating takes seconds; copying it does not)."""
    path = tmp_path_factory.mktemp("db") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def client(
    tmp_path: Path, empty_db: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MlflowClient]:
    """A fresh sqlite registry for this test; the global tracking URI is restored after."""
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield MlflowClient(uri, uri)
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def _run_id(client: MlflowClient, tmp: Path) -> str:
    exp = client.get_experiment_by_name("pretrain") or client.get_experiment(
        client.create_experiment("pretrain", artifact_location=(tmp / "artifacts").as_uri())
    )
    return client.create_run(exp.experiment_id).info.run_id


def register_tiny(
    client: MlflowClient, tmp: Path, name: str, *, seed: int, parity: float | None = None
) -> Registration:
    """Build, save, export and register a tiny ViT encoder (weights fixed by ``seed``)."""
    torch.manual_seed(seed)
    encoder = build_encoder(ARCH).eval()
    weights = save_encoder(tmp / f"{name}-{seed}" / "encoder.safetensors", encoder, ARCH, PREP)
    onnx_path = export_onnx(encoder, PREP, tmp / f"{name}-{seed}" / "encoder.onnx")
    example = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        features = encode(encoder, torch.from_numpy(example)).numpy()
    prep = json.loads(PREP.to_json())
    return register_onnx(
        client,
        name=name,
        onnx_path=onnx_path,
        weights_path=weights,
        run_id=_run_id(client, tmp),
        parity=onnx_parity(encoder, onnx_path) if parity is None else parity,
        input_example=example,
        output_example=features,
        metadata={"preprocessing": prep, "arch": ARCH.model_dump(), "output": "features"},
        tags=LINEAGE,
        attachments={
            "model_card.md": model_card(
                name=name,
                fm=Replicate(
                    FM("mae-hospital", "hospital", "mae", Path("c"), imported=False),
                    index=0,
                    name="mae-hospital-r0",
                    seed=0,
                    source=Path("c/hospital-r0"),
                ),
                tags=LINEAGE,
                preprocessing=prep,
                arch=ARCH.model_dump(),
                data_card=None,
            )
        },  # fmt: skip
        description="tiny test encoder",
    )


def test_parity_above_limit_is_refused_and_nothing_registered(
    client: MlflowClient, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    exported, other = build_encoder(ARCH).eval(), build_encoder(ARCH).eval()
    onnx_path = export_onnx(exported, PREP, tmp_path / "fm.onnx")
    measured = onnx_parity(other, onnx_path)  # the graph does not compute `other`
    assert measured > 1e-4
    with pytest.raises(RegistrationError, match="differs from PyTorch"):
        register_tiny(client, tmp_path, "fm-bad", seed=1, parity=measured)
    with pytest.raises(RegistrationError):
        register_tiny(client, tmp_path, "fm-bad", seed=1, parity=float("nan"))
    assert client.search_model_versions("name = 'fm-bad'") == []
    assert client.search_registered_models("name = 'fm-bad'") == []


def test_same_weights_make_no_new_version_and_move_candidate_back(
    client: MlflowClient, tmp_path: Path
) -> None:
    first = register_tiny(client, tmp_path / "a", "fm-x", seed=1)
    second = register_tiny(client, tmp_path / "b", "fm-x", seed=2)
    assert (first.created, second.created) == (True, True)
    assert str(client.get_model_version_by_alias("fm-x", CANDIDATE).version) == second.version
    again = register_tiny(client, tmp_path / "c", "fm-x", seed=1)  # rebuilt, same weights
    assert not again.created and again.version == first.version
    tags = client.get_model_version("fm-x", first.version).tags
    assert tags["weights.content"] == weights_digest(
        tmp_path / "c" / "fm-x-1" / "encoder.safetensors"
    )
    assert len(client.search_model_versions("name = 'fm-x'")) == 2
    assert str(client.get_model_version_by_alias("fm-x", CANDIDATE).version) == first.version


def test_version_carries_lineage_signature_preprocessing_weights_and_card(
    client: MlflowClient, tmp_path: Path
) -> None:
    reg = register_tiny(client, tmp_path, "fm-y", seed=3)
    tags = client.get_model_version("fm-y", reg.version).tags
    for key in REQUIRED_TAGS:
        assert tags.get(key) not in (None, "", "unknown"), key
    assert tags["weights.sha256"] == reg.weights_sha256
    assert float(tags["onnx.parity"]) <= 1e-4 and tags["onnx.opset"] == "17"

    uri = f"models:/fm-y@{CANDIDATE}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))
    meta = Model.load(str(local))
    assert "onnx" in meta.flavors and meta.signature is not None
    assert list(meta.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 16, 16]
    assert meta.saved_input_example_info is not None
    assert Preprocessing.from_json(json.dumps(meta.metadata["preprocessing"])) == PREP

    files = {p.name: p for p in local.rglob("*") if p.is_file()}
    assert "model_card.md" in files and "Intended use" in files["model_card.md"].read_text()
    assert sha256_file(files["encoder.safetensors"]) == reg.weights_sha256
    assert set(load_file(str(files["encoder.safetensors"]))) >= {"cls_token", "pos_embed"}

    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(np.zeros((3, 3, 16, 16), dtype=np.float32))
    features = np.asarray(next(iter(out.values())) if isinstance(out, dict) else out)
    assert features.shape == (3, ARCH.embed_dim) and np.isfinite(features).all()
