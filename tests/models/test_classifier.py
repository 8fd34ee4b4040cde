"""Classifier: encoder + head -> probabilities, from a linear probe or a fine-tuned ViT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from retfm.data.images import ArrayImages
from retfm.models.classifier import Classifier, probe_head
from retfm.models.encoder import Preprocessing, build_encoder
from retfm.settings import ModelPreset
from retfm.training.features import extract_features

ARCH = ModelPreset(
    img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
)  # fmt: skip
PREP = Preprocessing(img_size=16)


def trained_like_probe(k: int) -> torch.nn.Sequential:
    """A probe head whose BatchNorm holds non-trivial running statistics, as after training."""
    head = probe_head(ARCH.embed_dim, k)
    head[0].running_mean.normal_()
    head[0].running_var.uniform_(0.5, 2.0)
    head[1].weight.data.normal_()
    return head.eval()


def images(n: int = 9) -> ArrayImages:
    rng = np.random.default_rng(0)
    return ArrayImages(rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8))


def test_probe_classifier_equals_softmax_of_head_on_features() -> None:
    torch.manual_seed(0)
    encoder, head = build_encoder(ARCH), trained_like_probe(3)
    source = images()
    features = extract_features(encoder, PREP, source, progress=False)
    with torch.inference_mode():
        expected = head(torch.from_numpy(features)).softmax(-1).numpy()
    clf = Classifier.from_probe(encoder, head, classes=["a", "b", "c"], prep=PREP)
    with torch.inference_mode():
        probs = clf(PREP.normalise(torch.from_numpy(source.array))).numpy()
    assert probs.shape == (9, 3)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert clf.classes == ("a", "b", "c") and clf.num_classes == 3 and clf.prep == PREP
    assert not any(p.requires_grad for p in clf.encoder.parameters())


def test_from_vit_moves_the_head_out_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    vit = build_encoder(ARCH, num_classes=4).eval()
    x = PREP.normalise(torch.from_numpy(images().array))
    with torch.inference_mode():
        expected = vit(x).softmax(-1)
    clf = Classifier.from_vit(vit)
    with torch.inference_mode():
        probs = clf(x)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    assert isinstance(clf.encoder.head, torch.nn.Identity)
    assert clf.features(x).shape == (9, ARCH.embed_dim)
    assert clf.num_classes == 4
    assert not any(k.startswith("encoder.head") for k in clf.state_dict())


def test_mismatched_parts_are_refused() -> None:
    with pytest.raises(ValueError, match="still has its own classification head"):
        Classifier(build_encoder(ARCH, num_classes=2), probe_head(ARCH.embed_dim, 2))
    with pytest.raises(ValueError, match="no classification head"):
        Classifier.from_vit(build_encoder(ARCH))


@pytest.mark.e2e
def test_classifier_exports_to_onnx(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = Classifier.from_probe(build_encoder(ARCH), trained_like_probe(2))
    path = tmp_path / "classifier.onnx"
    torch.onnx.export(
        clf,
        (torch.zeros(2, 3, 16, 16),),
        str(path),
        input_names=["image"],
        output_names=["probs"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        dynamo=True,
        verbose=False,
    )
    x = PREP.normalise(torch.from_numpy(images(5).array))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_probs,) = session.run(["probs"], {"image": x.numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(onnx_probs, clf(x).numpy(), atol=1e-5)
