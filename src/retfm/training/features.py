"""Frozen-encoder features: computed once per (encoder, task), shared by every linear-probe seed.

A linear probe never changes the encoder, so running the ViT once over the task's images and
training each seed's head on the cached (N, D) matrix makes a seed cost milliseconds, not an
encoder pass per epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from retfm.data.images import ImageSource
from retfm.models.encoder import Preprocessing, encode


def _batches(n: int, batch_size: int) -> list[np.ndarray]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [np.arange(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _check_size(images: ImageSource, prep: Preprocessing) -> None:
    if len(images) == 0:
        raise ValueError("images: the image source is empty; nothing to extract features from")
    first = images.take(np.array([0]))
    sides = {prep.view_size, prep.img_size}
    if first.dtype != np.uint8 or first.shape[3:] != (3,) or first.shape[1] != first.shape[2] \
            or first.shape[1] not in sides:  # fmt: skip
        raise ValueError(
            f"images: expected uint8 images of shape (P, P, 3) with P = the encoder's view size "
            f"{prep.view_size} (or its input size {prep.img_size}), got {first.dtype} "
            f"{first.shape[1:]} (pack the task at that size)"
        )


def extract_features(
    encoder: VisionTransformer,
    prep: Preprocessing,
    images: ImageSource,
    *,
    batch_size: int = 128,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Pooled, normed encoder features for every image, in source order.

    images: N uint8 (P, P, 3), packed at the view size (the centre S x S is taken, RETFound's
    evaluation view) -> (N, D) float32, D = encoder embed_dim. The encoder is put in
    eval mode (no drop path) and left there; ``device`` defaults to the encoder's own device.
    """
    _check_size(images, prep)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    encoder = encoder.to(device).eval()
    chunks: list[np.ndarray] = []
    batches = _batches(len(images), batch_size)
    with torch.inference_mode():
        for idx in tqdm(batches, desc="features", disable=not progress, leave=False):
            x = prep.eval_batch(images.take(idx)).to(device)
            chunks.append(encode(encoder, x).float().cpu().numpy())
    return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)


class OnnxFeatureExtractor:
    """The same features from an exported encoder, through onnxruntime.

    The ONNX graph takes ``image`` float32 (B, 3, S, S), already normalised, and returns
    ``features`` (B, D): what a serving host runs, so its features can be checked against
    :func:`extract_features` without torch in the loop.
    """

    def __init__(self, onnx_path: str | Path, prep: Preprocessing) -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        self.prep = prep
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if "image" not in inputs or "features" not in outputs:
            raise ValueError(
                f"{path}: expected an input named 'image' and an output named 'features', "
                f"got inputs {inputs} and outputs {outputs}"
            )

    def __call__(
        self, images: ImageSource, *, batch_size: int = 128, progress: bool = True
    ) -> np.ndarray:
        """images: N uint8 (S, S, 3) -> (N, D) float32."""
        _check_size(images, self.prep)
        chunks = []
        batches = _batches(len(images), batch_size)
        for idx in tqdm(batches, desc="features", disable=not progress, leave=False):
            x = self.prep.eval_batch(images.take(idx)).numpy()
            (features,) = self.session.run(["features"], {"image": x})
            chunks.append(np.asarray(features, dtype=np.float32))
        return np.concatenate(chunks, axis=0)
