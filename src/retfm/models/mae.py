"""Masked autoencoder (MAE, He et al. 2022) around the project's timm ViT encoder.

The encoder *is* :func:`retfm.models.encoder.build_encoder` (a timm ``VisionTransformer``); this
module only adds what pre-training needs: fixed 2-D sin-cos position embeddings, random
masking, and a light decoder made of timm ``Block``s. After the encoder blocks the tokens go
through MAE's own final norm (``self.norm``, MAE's ``norm``), which belongs to pre-training:
the encoder that is kept starts its pooled-feature norm (``fc_norm``) fresh, exactly as
RETFound's fine-tuning model does with any MAE checkpoint (``del self.norm``; ``fc_norm``
missing from the checkpoint), so an FM pre-trained here and a released one are read alike.

Shapes: B batch, C=3 channels, S image side, p patch side, L=(S/p)^2 patches, K=L*(1-ratio) kept
patches, D encoder width, Dd decoder width.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from retfm.models.encoder import build_encoder
from retfm.settings import ModelPreset


def sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """(1, 1 + grid*grid, dim): 2-D sin-cos table with a zero row for the class token.

    Fixed rather than learned, as in MAE: masking shows the encoder a different subset of
    positions every step, and a fixed table keeps positions meaningful from the first step.
    """
    table = build_sincos2d_pos_embed([grid, grid], dim=dim)
    return torch.cat([torch.zeros(1, dim), table], dim=0).unsqueeze(0)


class MaskedAutoencoder(nn.Module):
    """MAE pre-training wrapper; ``self.encoder`` is the timm ViT that is kept afterwards."""

    def __init__(
        self, arch: ModelPreset, *, mask_ratio: float = 0.75, norm_pix_loss: bool = True
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.arch = arch
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = arch.patch_size
        self.grid = arch.img_size // arch.patch_size
        num_patches = self.grid * self.grid

        self.encoder = build_encoder(arch)
        self.encoder.fc_norm.requires_grad_(False)  # not used here: fresh for adaptation
        self.norm = LayerNorm(arch.embed_dim)  # MAE's final token norm (timm's, eps=1e-6)
        self._pos_and_cls()[0].requires_grad_(False)

        dd = arch.decoder_embed_dim
        self.decoder_embed = nn.Linear(arch.embed_dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, dd), requires_grad=False
        )
        self.decoder_blocks = nn.Sequential(
            *[
                Block(
                    dd, arch.decoder_num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=LayerNorm
                )
                for _ in range(arch.decoder_depth)
            ]
        )
        self.decoder_norm = LayerNorm(dd)  # timm's, eps=1e-6 like the encoder's
        self.decoder_pred = nn.Linear(dd, arch.patch_size**2 * 3)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """MAE's initialisation: sin-cos positions, xavier linears (patch embed as a linear)."""
        pos_embed, cls_token = self._pos_and_cls()
        with torch.no_grad():
            pos_embed.copy_(sincos_pos_embed(self.grid, self.arch.embed_dim))
            self.decoder_pos_embed.copy_(sincos_pos_embed(self.grid, self.arch.decoder_embed_dim))
            w = self.encoder.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(cls_token, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _pos_and_cls(self) -> tuple[nn.Parameter, nn.Parameter]:
        pos, cls = self.encoder.pos_embed, self.encoder.cls_token
        assert pos is not None and cls is not None, "build_encoder makes both"
        return pos, cls

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW must not decay (tokens and position tables)."""
        return {"encoder.cls_token", "encoder.pos_embed", "mask_token", "decoder_pos_embed"}

    # ------------------------------------------------------------- patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, L, p*p*3), patches in row-major order, pixels as (p, p, C)."""
        b, c, h, w = imgs.shape
        p = self.patch_size
        if h != w or h % p or c != 3:
            raise ValueError(f"expected (B, 3, S, S) with S a multiple of {p}, got {imgs.shape}")
        g = h // p
        x = imgs.reshape(b, 3, g, p, g, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(b, g * g, p * p * 3)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*3) -> (B, 3, S, S); the inverse of :meth:`patchify`."""
        b, n, _ = x.shape
        p = self.patch_size
        g = int(round(n**0.5))
        if g * g != n:
            raise ValueError(f"{n} patches do not form a square grid")
        x = x.reshape(b, g, g, p, p, 3)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(b, 3, g * p, g * p)

    # ------------------------------------------------------------- masking
    def random_masking(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random K of L tokens per sample (shuffle by argsort of uniform noise).

        x: (B, L, D) -> kept (B, K, D), mask (B, L) with 1 = removed, ids_restore (B, L)
        (the permutation that puts the shuffled sequence back in order).
        """
        b, n, d = x.shape
        keep = int(n * (1 - self.mask_ratio))
        noise = torch.rand(b, n, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return kept, mask, ids_restore

    # -------------------------------------------------------------- passes
    def forward_encoder(
        self, imgs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> latent (B, 1+K, D) (class token first), mask (B, L), ids (B, L)."""
        enc = self.encoder
        pos_embed, cls_token = self._pos_and_cls()
        x = enc.patch_embed(imgs)  # (B, L, D)
        x = x + pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x)
        cls = (cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = enc.norm_pre(x)
        x = enc.blocks(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1+K, D), ids_restore (B, L) -> pixel predictions (B, L, p*p*3)."""
        x = self.decoder_embed(latent)  # (B, 1+K, Dd)
        b, n_vis, dd = x.shape
        n = ids_restore.shape[1]
        masked = self.mask_token.expand(b, n + 1 - n_vis, -1)
        seq = torch.cat([x[:, 1:, :], masked], dim=1)  # (B, L, Dd), shuffled order
        seq = torch.gather(seq, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))
        x = torch.cat([x[:, :1, :], seq], dim=1) + self.decoder_pos_embed
        x = self.decoder_blocks(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared error on removed patches only; imgs (B, 3, S, S), pred (B, L, p*p*3),
        mask (B, L). With ``norm_pix_loss`` each target patch is standardised first, which MAE
        found gives better features (the decoder need not model local brightness)."""
        target = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> loss (scalar), pred (B, L, p*p*3), mask (B, L)."""
        latent, mask, ids_restore = self.forward_encoder(imgs)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask
