"""INT8 dynamic quantisation of an exported ONNX model, for CPU serving.

Dynamic quantisation stores MatMul/Gemm weights as int8 and quantises activations on the fly,
so it needs no calibration data: a ViT's cost is almost all in those matmuls. What it costs in
accuracy is measured (``benchmarks/bench_onnx.py`` compares AUROC), not assumed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process


def quantize_onnx(src: Path, dst: Path) -> Path:
    """Write an INT8 dynamically quantised copy of ``src`` to ``dst``; returns ``dst``.

    The graph is pre-processed first (shape inference and ONNX Runtime's own fusions, as the
    onnxruntime docs advise) so the quantiser sees every matmul. The input/output names, the
    dynamic batch axis and the metadata (preprocessing, output name) are kept, so a quantised
    model is served exactly like the fp32 one.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    original = onnx.load(str(src), load_external_data=False)
    with tempfile.TemporaryDirectory() as tmp:
        # Intermediate shapes recorded by the exporter (the dynamo one records them for its
        # example batch) would contradict a re-inference under another batch: drop them.
        bare = onnx.load(str(src))
        del bare.graph.value_info[:]
        onnx.save(bare, str(Path(tmp) / "bare.onnx"))
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(Path(tmp) / "bare.onnx"), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(
            prepared, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
        )
    quantized = onnx.load(str(dst))
    del quantized.metadata_props[:]
    for prop in original.metadata_props:
        quantized.metadata_props.add(key=prop.key, value=prop.value)
    quantized.metadata_props.add(key="quantization", value="int8-dynamic")
    onnx.save(quantized, str(dst))
    return dst
