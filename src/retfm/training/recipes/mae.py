"""MAE, the RETFound recipe: a masked autoencoder on the ViT, one random resized crop per image.

Follows MAE's ``main_pretrain.py`` / ``train_one_epoch``: AdamW (no decay on biases, norms,
tokens and position tables), lr = ``base_lr * effective batch / 256`` warmed up linearly then
cosine, set every iteration; the pixel loss on removed patches (:mod:`retfm.models.mae`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay
from torch import nn

from retfm.models.encoder import load_encoder
from retfm.models.mae import MaskedAutoencoder
from retfm.settings import MAERecipeSettings, ModelPreset
from retfm.training.augment import mae_batch
from retfm.training.recipes import Progress, Recipe
from retfm.training.schedule import effective_lr, lr_at, set_lr


def build_optimizer(
    model: MaskedAutoencoder, cfg: MAERecipeSettings, lr: float
) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: biases, norms, tokens and position
    tables are exempt (timm's grouping), as decaying them only shrinks useful offsets."""
    groups = param_groups_weight_decay(
        model, cfg.weight_decay, no_weight_decay_list=model.no_weight_decay()
    )
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)


def init_from(model: MaskedAutoencoder, path: Path) -> None:
    """Start from existing weights: a retfm encoder (.safetensors) or an MAE ``{"model": ...}``
    checkpoint (encoder and, when present, decoder), as RETFound started from ImageNet MAE."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrain.mae.init_from: {path} does not exist")
    if path.suffix == ".safetensors":
        encoder, _, _, _ = load_encoder(path)
        try:
            model.encoder.load_state_dict(encoder.state_dict(), strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"pretrain.mae.init_from: {path} does not fit this arch: {err}"
            ) from None
        return
    from retfm.models.checkpoints import load_mae_pretraining_weights

    load_mae_pretraining_weights(model, path)


class MAE(Recipe):
    name = "mae"
    cfg: MAERecipeSettings

    @property
    def peak_lr(self) -> float:
        return effective_lr(self.cfg.base_lr, self.images_per_step, 1, 1)

    def build(self) -> nn.Module:
        model = MaskedAutoencoder(
            self.arch, mask_ratio=self.cfg.mask_ratio, norm_pix_loss=self.cfg.norm_pix_loss
        )
        if self.cfg.init_from:
            init_from(model, Path(self.cfg.init_from))
        return model

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        assert isinstance(model, MaskedAutoencoder)
        return build_optimizer(model, self.cfg, self.peak_lr)

    def schedule(self, optimizer: torch.optim.Optimizer, at: Progress) -> dict[str, float]:
        lr = lr_at(at.epoch, peak_lr=self.peak_lr, min_lr=self.cfg.min_lr,
                   warmup_epochs=self.cfg.warmup_epochs, total_epochs=at.total_epochs)  # fmt: skip
        set_lr(optimizer, lr)
        return {"lr": lr}

    def loss(
        self, net: nn.Module, images: torch.Tensor, at: Progress
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, _, _ = net(mae_batch(images, self.prep))
        return loss, {}

    def encoder(self, model: nn.Module) -> VisionTransformer:
        assert isinstance(model, MaskedAutoencoder)
        return model.encoder

    def spec(self) -> ModelPreset:
        return self.arch


RECIPE = MAE
