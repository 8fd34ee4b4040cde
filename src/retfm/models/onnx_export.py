"""ONNX export of an encoder (features) or classifier (logits), and a parity check against torch.

The exported graph takes normalised images, so the preprocessing (stored in the model's
metadata) is the one contract a serving side must honour.

The FM encoder goes through the TorchScript-based exporter (``dynamo=False``), deprecated but
still shipped in torch 2.14. Measured here on a small ViT: it writes opset 17 in ~0.7 s with
byte-identical files for identical weights, whereas the ``torch.export`` path took ~6 s and
emits opset 18 only (its down-conversion to 17 fails on ``ReduceMean``). A ViT has no
data-dependent control flow, so tracing loses nothing; the deprecation warnings it raises are
silenced for this call only. Other modules (classifiers, whose BatchNorm heads need static
channel sizes under a dynamic batch) go through the ``torch.export`` path at opset >= 18.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from retfm.models.encoder import Preprocessing, encode

INPUT_NAME = "image"
FEATURES = "features"


class _Features(nn.Module):
    """Wraps a timm ViT so that ``forward`` gives pooled, normed features (B, D)."""

    def __init__(self, encoder: VisionTransformer) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return encode(self.encoder, x)


def exported_module(module: nn.Module, output_name: str = FEATURES) -> nn.Module:
    """The module whose ``forward`` the ONNX graph reproduces: :func:`encode` for a timm ViT
    exported as ``features``; the module's own ``forward`` (e.g. logits) otherwise."""
    if output_name == FEATURES and isinstance(module, VisionTransformer):
        return _Features(module)
    return module


def export_onnx(
    encoder: nn.Module,
    prep: Preprocessing,
    path: Path,
    *,
    opset: int = 17,
    output_name: str = FEATURES,
) -> Path:
    """Write ``encoder`` as ONNX: input ``image`` float32 (B, 3, S, S), normalised per ``prep``;
    output ``output_name`` (B, D) with a dynamic batch axis. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = exported_module(encoder, output_name).eval()
    example = torch.zeros(2, 3, prep.img_size, prep.img_size)
    # The TorchScript exporter is fast and exact for the plain ViT; it loses static channel
    # sizes under a dynamic batch axis, which BatchNorm (the linear-probe head) needs, so any
    # other module goes through the dynamo exporter, which keeps them.
    plain_vit = isinstance(module, _Features)
    model = _export(module, example, output_name, opset, dynamo=not plain_vit)
    meta = {"preprocessing": prep.to_json(), "output": output_name, "producer": "retfm"}
    del model.metadata_props[:]
    for key, value in sorted(meta.items()):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString(deterministic=True))
    tmp.replace(path)
    return path


def _export(
    module: nn.Module, example: torch.Tensor, output_name: str, opset: int, *, dynamo: bool
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if dynamo:
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=max(opset, 18),
                dynamo=True,
                verbose=False,
            )
            assert program is not None  # the dynamo path always returns its program
            return program.model_proto
        torch.onnx.export(
            module,
            (example,),
            buffer,  # type: ignore[arg-type]  # file-like objects work; the hint says paths
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def onnx_providers() -> list[str]:
    """CUDA first when both onnxruntime and torch can use a GPU, CPU always as fallback."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """The metadata written by :func:`export_onnx` (preprocessing JSON, output name)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def onnx_parity(module: nn.Module, path: Path, *, batch: int = 4, seed: int = 0) -> float:
    """Max abs difference between torch and onnxruntime outputs on random normalised input,
    over two batch sizes (``batch`` and ``batch + 3``, which also exercises the dynamic axis)."""
    session = ort.InferenceSession(str(path), providers=onnx_providers())
    inp = session.get_inputs()[0]
    out_name = session.get_outputs()[0].name
    side = int(inp.shape[-1])
    torch_module = exported_module(module, out_name).eval()
    device = next(torch_module.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for size in (batch, batch + 3):
        x = torch.randn(size, 3, side, side, generator=gen)
        with torch.no_grad():
            expected = torch_module(x.to(device)).float().cpu().numpy()
        (got,) = session.run([out_name], {inp.name: x.numpy()})
        if got.shape != expected.shape:
            raise AssertionError(f"{path}: ONNX output {got.shape} != torch {expected.shape}")
        worst = max(worst, float(np.max(np.abs(got - expected))))
    return worst
