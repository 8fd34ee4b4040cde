"""Learning-rate rules of the MAE/RETFound recipe.

The rate is a pure function of fractional epoch progress and is set on the optimizer every
iteration (not per epoch): that keeps warm-up smooth on small data sets and makes a resumed run
land on exactly the rate an uninterrupted run would have used.
"""

from __future__ import annotations

import math

import torch


def effective_lr(base_lr: float, batch_size: int, accum_steps: int, world_size: int) -> float:
    """The linear scaling rule: ``base_lr * effective_batch / 256``."""
    return base_lr * batch_size * accum_steps * world_size / 256.0


def lr_at(
    epoch: float, *, peak_lr: float, min_lr: float, warmup_epochs: float, total_epochs: float
) -> float:
    """Linear warm-up from 0 to ``peak_lr`` over ``warmup_epochs``, then half-cycle cosine down to
    ``min_lr`` at ``total_epochs``. ``epoch`` is fractional (2.5 = half-way through the third).
    """
    if epoch < warmup_epochs:
        return peak_lr * epoch / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-12)
    progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply ``lr`` to every group, honouring a per-group ``lr_scale`` (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
