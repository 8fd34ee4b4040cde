"""Importing released RETFound checkpoints: exact key layouts, equal outputs, unsafe pickles.

The files are built with the released layouts' real widths, names and image sizes (ViT-L/16
MAE at 224 px, ViT-L/14 DINOv2 at 224 px) but only 2 blocks deep, so each is ~100 MB instead
of ~1.2 GB; the importer infers the depth from the keys either way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from retfm.models.checkpoints import (
    CheckpointLayoutError,
    UnsafeCheckpointError,
    import_checkpoint,
    import_mae,
    load_mae_pretraining_weights,
)
from retfm.models.mae import MaskedAutoencoder

DEPTH = 2
# Top-level (non-block) keys of facebookresearch/mae's MaskedAutoencoderViT, i.e. RETFound_mae.
MAE_TOP_KEYS = {
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "norm.weight", "norm.bias", "mask_token", "decoder_pos_embed", "decoder_embed.weight",
    "decoder_embed.bias", "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight",
    "decoder_pred.bias",
}  # fmt: skip


def _mae_source() -> tuple[VisionTransformer, dict[str, torch.Tensor]]:
    """A ViT-L/16 encoder with MAE's token-norm head plus a decoder, in MAE's key layout."""
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=224, patch_size=16, embed_dim=1024, depth=DEPTH, num_heads=16,
        global_pool="token", num_classes=0,
    ).eval()  # fmt: skip
    with torch.no_grad():  # non-trivial norm affine, so a wrong mapping shows
        vit.norm.weight.uniform_(0.5, 1.5)
        vit.norm.bias.uniform_(-0.5, 0.5)
    state = dict(vit.state_dict())
    dec = Block(512, 16, qkv_bias=True)
    state.update({f"decoder_blocks.0.{k}": v for k, v in dec.state_dict().items()})
    state.update({
        "mask_token": torch.zeros(1, 1, 512),
        "decoder_pos_embed": torch.zeros(1, 197, 512),
        "decoder_embed.weight": torch.randn(512, 1024) * 0.02,
        "decoder_embed.bias": torch.zeros(512),
        "decoder_norm.weight": torch.ones(512),
        "decoder_norm.bias": torch.zeros(512),
        "decoder_pred.weight": torch.randn(16 * 16 * 3, 512) * 0.02,
        "decoder_pred.bias": torch.zeros(16 * 16 * 3),
    })  # fmt: skip
    return vit, state


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VisionTransformer]:
    vit, state = _mae_source()
    assert {k for k in state if not k.startswith(("blocks.", "decoder_blocks."))} == MAE_TOP_KEYS
    path = tmp_path_factory.mktemp("mae") / "RETFound_mae_meh.pth"
    torch.save({"model": state, "epoch": 799}, path)
    return path, vit


def _pooled_reference(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """What the imported encoder must compute: mean of patch tokens, then the released norm."""
    tokens = vit.blocks(vit._pos_embed(vit.patch_embed(x)))
    pooled = tokens[:, 1:].mean(dim=1)
    return F.layer_norm(pooled, (1024,), vit.norm.weight, vit.norm.bias, eps=1e-6)


def test_mae_import_infers_vit_large_and_reproduces_features(
    mae_file: tuple[Path, VisionTransformer],
) -> None:
    path, vit = mae_file
    encoder, prep = import_checkpoint(path, "mae")
    assert isinstance(encoder, VisionTransformer)
    assert (encoder.embed_dim, len(encoder.blocks), encoder.blocks[0].attn.num_heads) == (
        1024, DEPTH, 16,
    )  # fmt: skip
    assert prep.img_size == 224 and encoder.patch_embed.patch_size == (16, 16)
    assert not any(k.startswith(("decoder", "mask_token")) for k in encoder.state_dict())
    torch.manual_seed(1)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = encoder.forward_features(x)
        # tokens before the norm are the source's block outputs ...
        assert torch.allclose(tokens, vit.blocks(vit._pos_embed(vit.patch_embed(x))), atol=1e-5)
        # ... and the features are their mean through the released norm
        got = encoder.forward_head(tokens, pre_logits=True)
        assert torch.allclose(got, _pooled_reference(vit, x), atol=1e-5)


def test_mae_import_can_leave_fc_norm_fresh(mae_file: tuple[Path, VisionTransformer]) -> None:
    encoder, arch, _ = import_mae(mae_file[0], fc_norm_from="fresh")
    assert torch.equal(encoder.fc_norm.weight, torch.ones(1024))
    assert torch.equal(encoder.fc_norm.bias, torch.zeros(1024))
    assert (arch.decoder_embed_dim, arch.decoder_depth) == (512, 1)


def test_mae_weights_continue_pretraining(mae_file: tuple[Path, VisionTransformer]) -> None:
    encoder, arch, _ = import_mae(mae_file[0])
    mae = MaskedAutoencoder(arch)
    load_mae_pretraining_weights(mae, mae_file[0])
    assert torch.equal(mae.encoder.blocks[1].mlp.fc2.weight, encoder.blocks[1].mlp.fc2.weight)
    assert torch.equal(mae.encoder.fc_norm.weight, mae_file[1].norm.weight)
    assert mae.decoder_pred.weight.shape == (768, 512)


def test_dinov2_teacher_import_matches_timm_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model(
        "vit_large_patch14_dinov2", pretrained=False, img_size=224, depth=DEPTH, num_classes=0
    ).eval()
    with torch.no_grad():  # bf16 file, as a half-size release would be: compare to the rounded
        for p in source.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    backbone = {f"backbone.{k}": v.to(torch.bfloat16) for k, v in source.state_dict().items()}
    assert "backbone.blocks.0.ls1.gamma" in backbone and "backbone.blocks.1.ls2.gamma" in backbone
    teacher = {
        **backbone,
        "backbone.mask_token": torch.zeros(1, 1024, dtype=torch.bfloat16),
        "dino_head.mlp.0.weight": torch.zeros(8, 1024, dtype=torch.bfloat16),
        "ibot_head.mlp.0.weight": torch.zeros(8, 1024, dtype=torch.bfloat16),
    }  # fmt: skip
    path = tmp_path / "RETFound_dinov2_meh.pth"
    torch.save({"teacher": teacher}, path)

    model, prep = import_checkpoint(path, "dinov2")
    assert prep.img_size == 224 and len(model.blocks) == DEPTH
    assert model.patch_embed.patch_size == (14, 14) and model.embed_dim == 1024
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        got = model(x)
        assert got.shape == (1, 1024)
        assert torch.allclose(got, source(x), atol=1e-5)


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": Exploit()}}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        import_checkpoint(path, "mae")
    with pytest.raises(UnsafeCheckpointError):
        import_checkpoint(path, "dinov2")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load does run it
    assert marker.exists()


def test_wrong_layout_errors_name_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointLayoutError, match=r"\{'model': state_dict\}.*state_dict"):
        import_checkpoint(path, "mae")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointLayoutError, match="missing .*patch_embed.proj.weight.*fc.weight"):
        import_checkpoint(path, "mae")
    torch.save({"teacher": {"blocks.0.norm1.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointLayoutError, match="no 'backbone.' keys"):
        import_checkpoint(path, "dinov2")


def test_missing_block_weights_are_listed(tmp_path: Path) -> None:
    _, state = _mae_source()
    del state["blocks.1.mlp.fc1.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointLayoutError, match=r"broken.pth.*missing blocks.1.mlp.fc1.weight"):
        import_checkpoint(path, "mae")
