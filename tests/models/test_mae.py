"""The MAE wrapper: each named step's shapes and the properties pre-training relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retfm.models.encoder import (
    EncoderSpec,
    Preprocessing,
    encode,
    load_encoder,
    save_encoder,
)
from retfm.models.mae import MaskedAutoencoder, sincos_pos_embed
from retfm.settings import ModelPreset

ARCH = ModelPreset(
    img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
)  # fmt: skip
L = (32 // 8) ** 2  # 16 patches
KEEP = int(L * (1 - 0.75))  # 4 visible


@pytest.fixture()
def mae() -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(ARCH, mask_ratio=0.75)


def test_patchify_shape_and_inverse(mae: MaskedAutoencoder) -> None:
    x = torch.randn(3, 3, 32, 32)
    patches = mae.patchify(x)
    assert patches.shape == (3, L, 8 * 8 * 3)
    # patch 1 is the second patch of the first row: pixels [0:8, 8:16], stored as (p, p, C)
    assert torch.equal(patches[0, 1], x[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1))
    assert torch.equal(mae.unpatchify(patches), x)


def test_patchify_rejects_wrong_image_shape(mae: MaskedAutoencoder) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        mae.patchify(torch.randn(1, 3, 30, 30))


def test_random_masking_keeps_a_quarter_and_restores_order(mae: MaskedAutoencoder) -> None:
    tokens = torch.arange(L, dtype=torch.float32).view(1, L, 1).expand(5, L, 4).clone()
    kept, mask, ids_restore = mae.random_masking(tokens)
    assert kept.shape == (5, KEEP, 4)
    assert mask.shape == (5, L) and ids_restore.shape == (5, L)
    assert torch.equal(mask.sum(dim=1), torch.full((5,), float(L - KEEP)))
    for b in range(5):
        visible = kept[b, :, 0].long()
        assert torch.all(mask[b, visible] == 0)  # the kept tokens are the unmasked ones
    # ids_restore inverts the shuffle: argsort(ids_restore) is the shuffle itself
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(L).expand(5, L))


def test_forward_encoder_and_decoder_shapes(mae: MaskedAutoencoder) -> None:
    x = torch.randn(2, 3, 32, 32)
    latent, mask, ids_restore = mae.forward_encoder(x)
    assert latent.shape == (2, 1 + KEEP, ARCH.embed_dim)
    pred = mae.forward_decoder(latent, ids_restore)
    assert pred.shape == (2, L, 8 * 8 * 3)
    loss, pred2, mask2 = mae(x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred2.shape == (2, L, 192) and mask2.shape == (2, L)


def test_tokens_go_through_mae_norm_and_fc_norm_stays_fresh(mae: MaskedAutoencoder) -> None:
    """Pre-training learns MAE's own final norm; the encoder's pooled-feature norm (fc_norm) is
    not used, so the kept encoder starts it fresh, as RETFound's fine-tuning model does."""
    assert isinstance(mae.encoder.norm, torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    before, _, _ = mae.forward_encoder(x)
    with torch.no_grad():
        mae.norm.bias.add_(3.0)
        mae.encoder.fc_norm.bias.add_(5.0)  # must not matter to pre-training
    torch.manual_seed(1)
    after, _, _ = mae.forward_encoder(x)
    assert torch.allclose(after - before, torch.full_like(before, 3.0), atol=1e-5)
    assert not mae.encoder.fc_norm.weight.requires_grad


def test_position_tables_are_fixed_sincos(mae: MaskedAutoencoder) -> None:
    assert not mae.encoder.pos_embed.requires_grad
    assert not mae.decoder_pos_embed.requires_grad
    assert torch.equal(mae.encoder.pos_embed, sincos_pos_embed(4, ARCH.embed_dim))
    assert torch.all(mae.encoder.pos_embed[0, 0] == 0)  # class token gets no position
    trainable = {n for n, p in mae.named_parameters() if p.requires_grad}
    assert "encoder.pos_embed" not in trainable and "encoder.cls_token" in trainable


def test_loss_counts_only_masked_patches(mae: MaskedAutoencoder) -> None:
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, L, 192)
    mask = torch.zeros(2, L)
    mask[:, :5] = 1
    base = mae.forward_loss(imgs, pred, mask)
    changed = pred.clone()
    changed[:, 5:] += 100.0  # visible patches: must not matter
    assert torch.equal(mae.forward_loss(imgs, changed, mask), base)
    changed[:, 0] += 1.0
    assert mae.forward_loss(imgs, changed, mask) > base


def test_norm_pix_loss_is_invariant_to_patch_brightness() -> None:
    torch.manual_seed(0)
    normed = MaskedAutoencoder(ARCH, norm_pix_loss=True)
    raw = MaskedAutoencoder(ARCH, norm_pix_loss=False)
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, L, 192)
    mask = torch.ones(2, L)
    shifted = imgs * 2.0 + 5.0  # per-patch standardisation removes this
    assert torch.allclose(
        normed.forward_loss(imgs, pred, mask), normed.forward_loss(shifted, pred, mask), atol=1e-4
    )
    assert not torch.allclose(
        raw.forward_loss(imgs, pred, mask), raw.forward_loss(shifted, pred, mask)
    )


def test_backward_reaches_encoder_and_decoder(mae: MaskedAutoencoder) -> None:
    loss, _, _ = mae(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert mae.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert mae.norm.weight.grad is not None
    assert mae.encoder.fc_norm.weight.grad is None
    assert mae.decoder_pred.weight.grad is not None
    assert mae.encoder.pos_embed.grad is None


def test_encoder_saves_as_feature_extractor(mae: MaskedAutoencoder, tmp_path: Path) -> None:
    prep = Preprocessing(img_size=32)
    path = save_encoder(tmp_path / "enc.safetensors", mae.encoder, ARCH, prep)
    encoder, spec, prep2, _ = load_encoder(path)
    assert spec == EncoderSpec.from_preset(ARCH) and prep2 == prep
    x = torch.randn(3, 3, 32, 32)
    mae.encoder.eval()
    with torch.no_grad():
        assert torch.equal(encode(encoder, x), encode(mae.encoder, x))
        assert encode(encoder, x).shape == (3, ARCH.embed_dim)


def test_rejects_mask_ratio_out_of_range() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedAutoencoder(ARCH, mask_ratio=1.0)
