"""The DINOv2 objective: DINO class-token loss, iBOT masked-patch loss, KoLeo, teacher centering.

Built on lightly's losses. lightly's ``DINOLoss`` and ``IBOTPatchLoss`` centre the teacher with a
moving-average softmax centre (DINO's rule, ``centering: softmax``); DINOv2's default is
Sinkhorn-Knopp centering (``centering: sinkhorn_knopp``), which lightly does not ship for these
losses, so for it the teacher's targets come from :func:`sinkhorn_knopp` (DINOv2's
``SinkhornKnoppTeacher``) and the same cross-entropies are computed here
(:func:`cross_view_ce`, :func:`masked_patch_ce`; checked against lightly's in the tests).

Shapes: V teacher (global) views, S student views (the V global ones first), B images, K
prototypes, M masked patches over the batch, (H, W) the patch grid.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
from torch import nn


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """(N, K) teacher logits -> (N, K) targets whose rows sum to 1 and whose prototypes are
    used equally over the batch (all ranks' rows together), DINOv2's teacher centering."""
    x = logits.float() / temp
    x = x - x.max()  # the normalisations below make the result shift-invariant
    q = torch.exp(x).t()  # (K, N)
    k = q.shape[0]
    n = torch.tensor(float(q.shape[1]), device=q.device)
    n = _all_reduce(n)
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


def cross_view_ce(
    targets: torch.Tensor, student: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """DINO loss: targets (V, B, K) probabilities, student (S, B, K) logits; the mean over
    images and over every (teacher view, student view) pair of different views of
    ``-sum_k p_t log softmax(s / temp)`` (lightly's ``DINOLoss`` formula)."""
    log_p = F.log_softmax(student.float() / student_temp, dim=-1)
    loss = -torch.einsum("tbk,sbk->ts", targets.float(), log_p)
    v = targets.shape[0]
    loss[:, :v].diagonal().zero_()  # the same view seen by teacher and student
    n_terms = loss.numel() - v
    if n_terms == 0:
        raise ValueError("the DINO loss needs at least two views")
    return loss.sum() / (n_terms * targets.shape[1])


def masked_patch_ce(
    targets: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """iBOT loss: targets (M, K) and student logits (M, K) of the masked patches, mask (B, H, W);
    each image's masked patches are averaged, then the sum over images is divided by B
    (lightly's ``IBOTPatchLoss`` formula)."""
    per_patch = -(targets.float() * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1)
    n_masked = mask.sum(dim=(1, 2), keepdim=True).clamp(min=1.0)
    weight = (1.0 / n_masked).expand_as(mask)[mask]
    return (per_patch * weight).sum() / mask.shape[0]


def normalised_entropy(probs: torch.Tensor) -> tuple[float, float]:
    """(N, K) probabilities -> (mean per-row entropy, entropy of the batch-mean distribution),
    both divided by log K: 1 = uniform, 0 = one prototype."""
    logk = math.log(probs.shape[-1])
    p = probs.float().clamp(min=1e-12)
    per_row = float(-(p * p.log()).sum(-1).mean()) / logk
    mean = p.mean(0)
    return per_row, float(-(mean * mean.log()).sum()) / logk


class DINOv2Objective(nn.Module):
    """The weighted sum of the three losses; its centres are buffers (checkpointed with it)."""

    def __init__(
        self,
        out_dim: int,
        *,
        centering: str,
        student_temp: float,
        center_momentum: float,
        weights: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.centering, self.student_temp = centering, student_temp
        self.w_dino, self.w_ibot, self.w_koleo = weights
        self.dino = DINOLoss(out_dim, student_temp=student_temp, center_momentum=center_momentum,
                             warmup_teacher_temp_epochs=1)  # fmt: skip
        self.ibot = IBOTPatchLoss(out_dim, student_temp=student_temp,
                                  center_momentum=center_momentum)  # fmt: skip
        self.koleo = KoLeoLoss()

    def forward(
        self,
        teacher_cls: torch.Tensor,
        student_cls: torch.Tensor,
        teacher_patches: torch.Tensor,
        student_patches: torch.Tensor,
        mask: torch.Tensor,
        student_global_tokens: torch.Tensor,
        teacher_temp: float,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """teacher_cls (V, B, K), student_cls (S, B, K) head logits; teacher/student_patches
        (M, K) head logits of the masked patches; mask (V*B, H, W); student_global_tokens
        (V, B, D) the student's class tokens (KoLeo). Returns the loss and its parts."""
        if self.centering == "sinkhorn_knopp":
            t = sinkhorn_knopp(teacher_cls.flatten(0, 1), teacher_temp).view_as(teacher_cls)
            dino = cross_view_ce(t, student_cls, self.student_temp)
        else:
            with torch.no_grad():
                t = F.softmax((teacher_cls.float() - self.dino.center) / teacher_temp, dim=-1)
            dino = self.dino(list(teacher_cls), list(student_cls), teacher_temp=teacher_temp)
        ibot = student_cls.new_zeros(())
        if len(teacher_patches):
            if self.centering == "sinkhorn_knopp":
                tp = sinkhorn_knopp(teacher_patches, teacher_temp)
                ibot = masked_patch_ce(tp, student_patches, mask, self.student_temp)
            else:
                ibot = self.ibot(teacher_patches, student_patches, mask, teacher_temp=teacher_temp)
        koleo = sum(self.koleo(view.float()) for view in student_global_tokens)
        loss = self.w_dino * dino + self.w_ibot * ibot + self.w_koleo * koleo
        parts = {
            "dino_loss": dino.detach(),
            "ibot_loss": ibot.detach(),
            "koleo_loss": torch.as_tensor(koleo).detach(),
            "teacher_probs": t.detach(),
        }
        return loss, parts
