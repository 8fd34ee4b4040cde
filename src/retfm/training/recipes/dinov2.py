"""DINOv2, the study's second recipe: self-distillation with an EMA teacher, on lightly's parts.

One step (DINOv2's ``SSLMetaArch`` on a single machine): multi-crop views of the packed uint8
batch (:func:`retfm.training.augment.multi_crop`), lightly's block masks on the global views,
the objective of :class:`retfm.models.dinov2.DINOv2` (DINO on the class token, iBOT on the masked
patches, KoLeo), gradients clipped, the last layer frozen for the first epoch(s), then the
teacher's EMA. Per-iteration schedules, each a pure function of progress: lr (linear warm-up,
cosine; ``base_lr * sqrt(effective batch / 1024)``, DINOv2's rule), weight decay (cosine up),
teacher momentum (cosine to 1) and teacher temperature (linear warm-up, then constant).
AdamW groups carry DINOv2's layer-wise lr decay, the patch embedding's lr multiplier and no
decay on biases, norms, layer scales and tokens.

Collapse, this family's classic failure, is watched on the teacher: the spread of its
class-token embeddings over the batch and the entropy of its mean output distribution; either
falling below its floor after ``collapse_after_epochs`` stops the run (:class:`CollapseError`).
"""

from __future__ import annotations

import math

import torch
from lightly.models.utils import random_block_mask
from lightly.utils.scheduler import cosine_schedule
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from retfm.models.dinov2 import DINOv2, dinov2_spec
from retfm.models.encoder import EncoderSpec
from retfm.settings import DINOv2RecipeSettings
from retfm.training.augment import multi_crop
from retfm.training.dino_losses import normalised_entropy
from retfm.training.recipes import Progress, Recipe
from retfm.training.schedule import lr_at, set_lr

_NO_DECAY_SUFFIXES = ("cls_token", "pos_embed", "reg_token", "mask_token", "gamma")


class CollapseError(RuntimeError):
    """The representation collapsed: every image gets (nearly) the same embedding or prototype."""


def _layer_id(name: str, depth: int) -> int:
    """DINOv2's ``get_vit_lr_decay_rate``: tokens and patch embedding 0, block i is i + 1,
    the rest (final norm, heads) depth + 1 (no decay)."""
    if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token")):
        return 0
    if ".blocks." in name:
        return int(name.split(".blocks.")[1].split(".")[0]) + 1
    return depth + 1


def param_groups(model: DINOv2, cfg: DINOv2RecipeSettings) -> list[dict]:
    """The student's parameters in AdamW groups with ``lr_scale``, ``wd_scale`` and
    ``last_layer`` (the prototypes, frozen during the first ``freeze_last_layer_epochs``)."""
    depth = len(model.student.vit.blocks)
    groups: dict[tuple[float, float, bool], dict] = {}
    for module_name, module in (("student", model.student), ("head", model.student_head),
                                ("ibot_head", model.student_ibot_head)):  # fmt: skip
        if module is None:
            continue
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            full = f"{module_name}.{name}"
            lr_scale = cfg.layer_decay ** (depth + 1 - _layer_id(full, depth))
            if "patch_embed" in full:
                lr_scale *= cfg.patch_embed_lr_mult
            no_decay = p.ndim == 1 or full.endswith(_NO_DECAY_SUFFIXES)
            last = "last_layer" in full
            key = (lr_scale, 0.0 if no_decay else 1.0, last)
            group = groups.setdefault(key, {"params": [], "lr_scale": key[0], "wd_scale": key[1],
                                            "last_layer": last})  # fmt: skip
            group["params"].append(p)
    return list(groups.values())


class DINOv2Recipe(Recipe):
    name = "dinov2"
    cfg: DINOv2RecipeSettings

    @property
    def peak_lr(self) -> float:
        return self.cfg.base_lr * math.sqrt(self.images_per_step / 1024)

    def spec(self) -> EncoderSpec:
        a = self.arch
        return dinov2_spec(a.img_size, a.patch_size, a.embed_dim, a.depth, a.num_heads,
                           self.cfg.layerscale)  # fmt: skip

    def build(self) -> nn.Module:
        return DINOv2(self.spec(), self.cfg)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        assert isinstance(model, DINOv2)
        return torch.optim.AdamW(
            param_groups(model, self.cfg),
            lr=self.peak_lr,
            betas=self.cfg.betas,
            weight_decay=self.cfg.weight_decay,
        )

    # ------------------------------------------------------------------ schedules
    def teacher_temp(self, at: Progress) -> float:
        c = self.cfg
        if at.epoch < c.warmup_teacher_temp_epochs:
            frac = at.epoch / c.warmup_teacher_temp_epochs
            return c.warmup_teacher_temp + frac * (c.teacher_temp - c.warmup_teacher_temp)
        return c.teacher_temp

    def momentum(self, at: Progress) -> float:
        return cosine_schedule(
            min(at.step, at.total_steps),
            at.total_steps,
            self.cfg.momentum_teacher,
            self.cfg.momentum_teacher_end,
        )

    def schedule(self, optimizer: torch.optim.Optimizer, at: Progress) -> dict[str, float]:
        c = self.cfg
        lr = lr_at(at.epoch, peak_lr=self.peak_lr, min_lr=c.min_lr,
                   warmup_epochs=c.warmup_epochs, total_epochs=at.total_epochs)  # fmt: skip
        wd = cosine_schedule(min(at.step, at.total_steps), at.total_steps, c.weight_decay,
                             c.weight_decay_end)  # fmt: skip
        set_lr(optimizer, lr)
        for group in optimizer.param_groups:
            group["weight_decay"] = wd * group.get("wd_scale", 1.0)
        return {"lr": lr, "weight_decay": wd, "teacher_temp": self.teacher_temp(at),
                "momentum": self.momentum(at)}  # fmt: skip

    # ------------------------------------------------------------------ one step
    def loss(
        self, net: nn.Module, images: torch.Tensor, at: Progress
    ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg
        glob, local = multi_crop(images, self.prep, local_crops=c.local_crops,
                                 local_size=c.local_crop_size, global_scale=c.global_crop_scale,
                                 local_scale=c.local_crop_scale)  # fmt: skip
        grid = self.arch.img_size // self.arch.patch_size
        mask = random_block_mask(
            (glob.shape[0], grid, grid),
            batch_mask_ratio=c.mask_probability,
            min_image_mask_ratio=c.mask_ratio_min_max[0],
            max_image_mask_ratio=c.mask_ratio_min_max[1],
            # DINOv2's blocks of >= 4 patches, fewer where a small grid masks fewer in all
            min_num_masks_per_block=min(4, int(grid * grid * c.mask_ratio_min_max[0])),
            device=glob.device,
        )
        loss, parts = net(glob, local, mask, self.teacher_temp(at))
        return loss, self._stats(parts)

    @staticmethod
    def _stats(parts: dict[str, torch.Tensor]) -> dict[str, float]:
        tokens = nn.functional.normalize(parts["teacher_cls_tokens"].float(), dim=-1)
        spread = float(tokens.std(dim=0).mean()) * math.sqrt(tokens.shape[-1])
        per_image, of_mean = normalised_entropy(parts["teacher_probs"].flatten(0, -2))
        return {
            "dino_loss": float(parts["dino_loss"]),
            "ibot_loss": float(parts["ibot_loss"]),
            "koleo_loss": float(parts["koleo_loss"]),
            "embedding_std": spread,
            "teacher_entropy": per_image,
            "teacher_mean_entropy": of_mean,
        }

    def before_step(self, model: nn.Module, at: Progress) -> dict[str, float]:
        assert isinstance(model, DINOv2)
        out = {}
        if self.cfg.clip_grad > 0:
            params = [p for m in model.students() for p in m.parameters() if p.grad is not None]
            out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad))
        if at.epoch < self.cfg.freeze_last_layer_epochs:
            for head in (model.student_head, model.student_ibot_head):
                if head is not None:
                    for p in head.last_layer.parameters():
                        p.grad = None
        return out

    def after_step(self, model: nn.Module, at: Progress) -> dict[str, float]:
        assert isinstance(model, DINOv2)
        model.update_teacher(self.momentum(at))
        return {}

    def check(self, stats: dict[str, float], at: Progress) -> None:
        c = self.cfg
        if at.epoch < c.collapse_after_epochs or "embedding_std" not in stats:
            return
        std, ent = stats["embedding_std"], stats["teacher_mean_entropy"]
        if std < c.min_embedding_std or ent < c.min_teacher_entropy:
            raise CollapseError(
                f"DINOv2 representation collapsed at optimizer step {at.step} (epoch "
                f"{at.epoch:.2f}): teacher embedding spread {std:.4f} (floor "
                f"{c.min_embedding_std}, 1 = isotropic), entropy of its mean output "
                f"{ent:.4f} (floor {c.min_teacher_entropy}, 1 = every prototype used). "
                "Every image now gets nearly the same representation. Try a lower "
                "pretrain.dinov2.base_lr, a longer warmup_teacher_temp_epochs or "
                "centering: sinkhorn_knopp; then delete the checkpoint and rerun."
            )

    def encoder(self, model: nn.Module) -> VisionTransformer:
        assert isinstance(model, DINOv2)
        return model.encoder


RECIPE = DINOv2Recipe
