"""extract_features (torch) and OnnxFeatureExtractor (onnxruntime) on a tiny encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from retfm.data.images import ArrayImages
from retfm.models.encoder import Preprocessing, build_encoder, encode
from retfm.settings import ModelPreset
from retfm.training.features import OnnxFeatureExtractor, extract_features

ARCH = ModelPreset(
    img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
)  # fmt: skip
PREP = Preprocessing(img_size=16)


@pytest.fixture(scope="module")
def encoder() -> nn.Module:
    torch.manual_seed(0)
    return build_encoder(ARCH).eval()


def random_images(n: int, size: int = 16, seed: int = 0) -> ArrayImages:
    rng = np.random.default_rng(seed)
    return ArrayImages(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_features_match_encoder_in_source_order(encoder: nn.Module) -> None:
    images = random_images(21)
    features = extract_features(encoder, PREP, images, batch_size=8, progress=False)
    assert features.shape == (21, ARCH.embed_dim) and features.dtype == np.float32
    with torch.inference_mode():
        direct = encode(encoder, PREP.normalise(torch.from_numpy(images.array))).numpy()
    np.testing.assert_allclose(features, direct, atol=1e-5)
    # batch size changes nothing; distinct images give distinct rows
    again = extract_features(encoder, PREP, images, batch_size=128, progress=False)
    np.testing.assert_allclose(features, again, atol=1e-5)
    assert np.abs(features[0] - features[1]).max() > 1e-3


def test_features_ignore_drop_path(tmp_path: Path) -> None:
    """Stochastic depth must be off: the same image twice gives the same feature."""
    torch.manual_seed(0)
    noisy = build_encoder(ARCH, drop_path=0.5).train()
    images = random_images(4)
    a = extract_features(noisy, PREP, images, progress=False)
    b = extract_features(noisy, PREP, images, progress=False)
    np.testing.assert_array_equal(a, b)


def test_wrong_size_or_empty_source_raises(encoder: nn.Module) -> None:
    with pytest.raises(ValueError, match="view size 16"):
        extract_features(encoder, PREP, random_images(3, size=24), progress=False)
    with pytest.raises(ValueError, match="empty"):
        extract_features(encoder, PREP, ArrayImages(np.zeros((0, 16, 16, 3), np.uint8)))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        extract_features(encoder, PREP, random_images(3), batch_size=0, progress=False)


class _Features(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return encode(self.encoder, image)


def _export(module: nn.Module, path: Path, output: str) -> Path:
    torch.onnx.export(
        module.eval(),
        (torch.zeros(2, 3, 16, 16),),
        str(path),
        input_names=["image"],
        output_names=[output],
        dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
        dynamo=True,
        verbose=False,
    )
    return path


@pytest.mark.e2e
def test_onnx_extractor_matches_torch(encoder: nn.Module, tmp_path: Path) -> None:
    path = _export(_Features(encoder), tmp_path / "encoder.onnx", "features")
    images = random_images(11)
    onnx_features = OnnxFeatureExtractor(path, PREP)(images, batch_size=4, progress=False)
    torch_features = extract_features(encoder, PREP, images, progress=False)
    assert onnx_features.shape == torch_features.shape
    np.testing.assert_allclose(onnx_features, torch_features, atol=1e-4)

    wrong = _export(_Features(encoder), tmp_path / "wrong.onnx", "embedding")
    with pytest.raises(ValueError, match="output named 'features'"):
        OnnxFeatureExtractor(wrong, PREP)


def test_onnx_extractor_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        OnnxFeatureExtractor(tmp_path / "absent.onnx", PREP)
