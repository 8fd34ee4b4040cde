"""ONNX export: names, dynamic batch, recorded opset and preprocessing, parity, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from retfm.models.encoder import Preprocessing, build_encoder, encode
from retfm.models.onnx_export import export_onnx, onnx_parity, read_onnx_metadata
from retfm.settings import ModelPreset

ARCH = ModelPreset(
    img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
)  # fmt: skip
PREP = Preprocessing(img_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder(ARCH).eval()


@pytest.fixture(scope="module")
def exported(encoder: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(encoder, PREP, tmp_path_factory.mktemp("onnx") / "fm.onnx")


def test_graph_has_named_io_dynamic_batch_and_opset(exported: Path) -> None:
    model = onnx.load(str(exported))
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "image" and out.name == "features"
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["batch", 3, 32, 32] and out_dims[0] == "batch"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {o.domain: o.version for o in model.opset_import}[""] == 17


def test_preprocessing_travels_in_metadata(exported: Path) -> None:
    meta = read_onnx_metadata(exported)
    assert meta["output"] == "features"
    assert Preprocessing.from_json(meta["preprocessing"]) == PREP
    assert json.loads(meta["preprocessing"])["img_size"] == 32


def test_onnxruntime_matches_torch_features(encoder: torch.nn.Module, exported: Path) -> None:
    assert onnx_parity(encoder, exported, batch=4) < 1e-4
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # dynamic batch axis
        x = torch.randn(batch, 3, 32, 32)
        (got,) = session.run(["features"], {"image": x.numpy()})
        with torch.no_grad():
            want = encode(encoder, x).numpy()
        assert got.shape == (batch, ARCH.embed_dim)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_parity_detects_a_different_model(exported: Path) -> None:
    torch.manual_seed(1)
    other = build_encoder(ARCH).eval()
    assert onnx_parity(other, exported) > 1e-2


def test_classifier_exports_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = build_encoder(ARCH, num_classes=3).eval()
    path = export_onnx(classifier, PREP, tmp_path / "clf.onnx", output_name="logits")
    model = onnx.load(str(path))
    assert [o.name for o in model.graph.output] == ["logits"]
    assert onnx_parity(classifier, path, batch=2) < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": np.zeros((2, 3, 32, 32), np.float32)})
    assert logits.shape == (2, 3)


def test_export_is_byte_deterministic_and_opset_selectable(
    encoder: torch.nn.Module, exported: Path, tmp_path: Path
) -> None:
    again = export_onnx(encoder, PREP, tmp_path / "again.onnx")
    assert again.read_bytes() == exported.read_bytes()
    newer = export_onnx(encoder, PREP, tmp_path / "opset18.onnx", opset=18)
    assert {o.domain: o.version for o in onnx.load(str(newer)).opset_import}[""] == 18
