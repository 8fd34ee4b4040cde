"""Training loops: FM pre-training (any recipe; resumable, data-parallel) and adaptation."""

from retfm.training.pretrain import (
    CheckpointMismatchError,
    NonFiniteLossError,
    TrainResult,
    pretrain_fm,
    read_checkpoint_extra,
)

__all__ = [
    "CheckpointMismatchError",
    "NonFiniteLossError",
    "TrainResult",
    "pretrain_fm",
    "read_checkpoint_extra",
]
