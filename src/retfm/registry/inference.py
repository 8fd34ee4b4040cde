"""Batch inference from a registered ONNX model with its own preprocessing.

``models:/<name>@<alias>`` is resolved through the registry, the ONNX file and the
preprocessing recorded in the model's metadata are read from the version itself, and ONNX
Runtime runs on CUDA when present, else on the CPU. An unreadable image becomes a row with
``status`` saying why: reported, never silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
from mlflow.models import Model
from tqdm import tqdm

from retfm.data.shards import load_image
from retfm.models.encoder import Preprocessing
from retfm.models.onnx_export import onnx_providers

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def providers() -> list[str]:
    """CUDA only where a GPU is really usable, CPU always. onnxruntime-gpu lists
    ``CUDAExecutionProvider`` even on a machine without a GPU, so its list alone is not enough."""
    return onnx_providers()


@dataclass
class OnnxModel:
    """A registered ONNX model ready to run: session, preprocessing, output name."""

    session: ort.InferenceSession
    prep: Preprocessing
    output: str
    metadata: dict

    @classmethod
    def load(cls, model_uri: str, *, int8: bool = False) -> OnnxModel:
        """``int8``: run an INT8 dynamically quantised copy (see benchmarks/bench_onnx.py)."""
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
        model = Model.load(str(local))
        flavor = model.flavors.get("onnx")
        if flavor is None:
            raise ValueError(f"{model_uri}: not an ONNX model (flavors {sorted(model.flavors)})")
        meta = model.metadata or {}
        if "preprocessing" not in meta:
            raise ValueError(f"{model_uri}: no preprocessing in the model metadata")
        raw = meta["preprocessing"]
        prep = Preprocessing.from_json(json.dumps(raw))
        onnx_file = local / flavor["data"]
        if int8:
            from retfm.models.quantize import quantize_onnx

            onnx_file = quantize_onnx(onnx_file, onnx_file.with_name("model.int8.onnx"))
        session = ort.InferenceSession(str(onnx_file), providers=providers())
        return cls(session, prep, session.get_outputs()[0].name, meta)

    def run(self, images_uint8: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 -> model output (B, D)."""
        x: np.ndarray = images_uint8.astype(np.float32) / np.float32(255.0)
        x = (x - np.asarray(self.prep.mean, np.float32)) / np.asarray(self.prep.std, np.float32)
        feed = {self.session.get_inputs()[0].name: np.ascontiguousarray(x.transpose(0, 3, 1, 2))}
        return self.session.run([self.output], feed)[0]


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Image files, folders (searched recursively) and CSV manifests with a ``path`` column."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.suffix.lower() == ".csv":
            manifest = pd.read_csv(item)
            if "path" not in manifest.columns:
                raise ValueError(f"{item}: a manifest needs a 'path' column")
            found += [(item.parent / p) for p in manifest["path"].astype(str)]
        else:
            found.append(item)
    return found


def predict_files(
    model_uri: str, inputs: Iterable[Path], *, batch_size: int = 64, int8: bool = False
) -> pd.DataFrame:
    """One row per input image: path, status ('ok' or the reason), and the model's outputs."""
    model = OnnxModel.load(model_uri, int8=int8)
    paths = expand_inputs(inputs)
    names = model.metadata.get("classes")
    rows: list[dict] = []
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch"):
        chunk = paths[start : start + batch_size]
        images, good = [], []
        for path in chunk:
            try:
                image = load_image(path, model.prep.view_size, fundus_crop=model.prep.fundus_crop)
                images.append(model.prep.center_crop(image[None])[0])
                good.append(path)
            except Exception as err:  # noqa: BLE001 - any decode failure is reported per file
                rows.append({"path": str(path), "status": f"unreadable: {err}"})
        if not images:
            continue
        outputs = model.run(np.stack(images))
        prefix = "prob" if model.output == "probabilities" else "feature"
        for path, out in zip(good, outputs, strict=True):
            row: dict[str, object] = {"path": str(path), "status": "ok"}
            row.update({f"{prefix}_{i}": float(v) for i, v in enumerate(out)})
            if names and prefix == "prob":
                row["predicted"] = names[int(np.argmax(out))]
            rows.append(row)
    order = {str(p): i for i, p in enumerate(paths)}
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=["path", "status"])
    return table.sort_values("path", key=lambda s: s.map(order)).reset_index(drop=True)
