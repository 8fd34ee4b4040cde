"""DINOv2 pre-training model (Oquab et al. 2023): a student ViT and its EMA teacher, on lightly.

Both backbones are the project's timm ViT (:class:`~retfm.models.encoder.EncoderSpec` with
layer scale, the class token as the feature: what the saved FM is) built with
``dynamic_img_size`` so that local crops of another size go through the same weights, and
wrapped in lightly's ``MaskedVisionTransformerTIMM`` (iBOT's mask token). Heads are lightly's
``DINOv2ProjectionHead`` (3-layer MLP, L2-normalised bottleneck, weight-normalised prototypes),
one shared by DINO and iBOT unless ``ibot_separate_head``. The teacher starts as a copy of the
student, has no drop path, never gets gradients and follows the student by EMA
(:meth:`DINOv2.update_teacher`). ``forward`` computes the whole objective, so that DDP sees one
forward per step.

Shapes: V=2 global views, N local views, B images, S/s global/local side, L patches of a
global view, D width, K prototypes, M masked patches over the batch.
"""

from __future__ import annotations

import copy
import warnings

import torch
from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
from lightly.models.utils import update_drop_path_rate, update_momentum
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from retfm.models.encoder import EncoderSpec
from retfm.settings import DINOv2RecipeSettings
from retfm.training.dino_losses import DINOv2Objective


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad = False


class DINOv2(nn.Module):
    def __init__(self, spec: EncoderSpec, cfg: DINOv2RecipeSettings) -> None:
        super().__init__()
        self.spec, self.cfg = spec, cfg
        vit = VisionTransformer(**spec.timm_kwargs(), num_classes=0, dynamic_img_size=True)
        # timm's initialisation (truncated normal 0.02, learned positions), as DINOv2's
        self.student = MaskedVisionTransformerTIMM(
            vit, weight_initialization="skip", antialias=False, pos_embed_initialization="skip"
        )
        nn.init.normal_(self.student.mask_token, std=0.02)
        self.teacher = copy.deepcopy(self.student)
        update_drop_path_rate(self.student.vit, cfg.drop_path, mode=cfg.drop_path_mode)

        def head() -> DINOv2ProjectionHead:
            with warnings.catch_warnings():  # lightly's head uses torch's old weight_norm
                warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm` is deprecated")
                return DINOv2ProjectionHead(spec.embed_dim, cfg.head_hidden_dim,
                                            cfg.head_bottleneck_dim, cfg.out_dim)  # fmt: skip

        self.student_head, self.teacher_head = head(), head()
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        self.student_ibot_head = self.teacher_ibot_head = None
        if cfg.ibot_separate_head:
            self.student_ibot_head, self.teacher_ibot_head = head(), head()
            self.teacher_ibot_head.load_state_dict(self.student_ibot_head.state_dict())
        for module in self.teachers():
            _freeze(module)
        self.objective = DINOv2Objective(
            cfg.out_dim,
            centering=cfg.centering,
            student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum,
            weights=(cfg.dino_loss_weight, cfg.ibot_loss_weight, cfg.koleo_loss_weight),
        )

    def teachers(self) -> list[nn.Module]:
        return [m for m in (self.teacher, self.teacher_head, self.teacher_ibot_head) if m]

    def students(self) -> list[nn.Module]:
        return [m for m in (self.student, self.student_head, self.student_ibot_head) if m]

    def train(self, mode: bool = True) -> DINOv2:
        super().train(mode)
        for module in self.teachers():
            module.eval()  # the teacher never drops paths
        return self

    @property
    def encoder(self) -> VisionTransformer:
        """The FM: the teacher's ViT (DINOv2 evaluates and releases the teacher)."""
        return self.teacher.vit

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        update_momentum(self.student, self.teacher, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)
        if self.student_ibot_head is not None:
            update_momentum(self.student_ibot_head, self.teacher_ibot_head, m=momentum)

    def _heads(
        self, student: bool, cls: torch.Tensor, patches: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass through a shared head for class tokens and masked patches together."""
        dino = self.student_head if student else self.teacher_head
        ibot = self.student_ibot_head if student else self.teacher_ibot_head
        if ibot is None:
            out = dino(torch.cat([cls, patches]))
            return out[: len(cls)], out[len(cls) :]
        return dino(cls), ibot(patches)

    def forward(
        self,
        global_views: torch.Tensor,
        local_views: torch.Tensor | None,
        block_mask: torch.Tensor,
        teacher_temp: float,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """global_views (V*B, 3, S, S), local_views (N*B, 3, s, s) or None, block_mask
        (V*B, H, W) bool (True: masked for the student) -> loss, parts and statistics."""
        v = 2
        b = global_views.shape[0] // v
        prefix = self.student.vit.num_prefix_tokens
        flat = block_mask.flatten(1)  # (V*B, L)
        with torch.no_grad():
            t_tokens = self.teacher.encode(global_views)  # (V*B, prefix+L, D)
            t_cls_tok = t_tokens[:, 0]
            t_cls, t_patch = self._heads(False, t_cls_tok, t_tokens[:, prefix:][flat])
        token_mask = torch.zeros(flat.shape[0], prefix + flat.shape[1], dtype=torch.bool,
                                 device=flat.device)  # fmt: skip
        token_mask[:, prefix:] = flat
        s_tokens = self.student.encode(global_views, mask=token_mask)
        s_global_cls = s_tokens[:, 0]
        cls = [s_global_cls]
        if local_views is not None:
            cls.append(self.student.encode(local_views)[:, 0])
        s_cls, s_patch = self._heads(True, torch.cat(cls), s_tokens[:, prefix:][flat])
        k = s_cls.shape[-1]
        loss, parts = self.objective(
            teacher_cls=t_cls.view(v, b, k),
            student_cls=s_cls.view(-1, b, k),
            teacher_patches=t_patch,
            student_patches=s_patch,
            mask=block_mask,
            student_global_tokens=s_global_cls.view(v, b, -1),
            teacher_temp=teacher_temp,
        )
        parts["teacher_cls_tokens"] = t_cls_tok.detach()
        return loss, parts


def dinov2_spec(img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                layerscale: float) -> EncoderSpec:  # fmt: skip
    """The saved FM's spec: a DINOv2 ViT (layer scale, class-token features after the final
    norm), as :mod:`retfm.models.checkpoints` reads the released RETFound-DINOv2 weights."""
    return EncoderSpec(
        family="dinov2",
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        init_values=layerscale,
        global_pool="token",
        fc_norm=False,
    )
