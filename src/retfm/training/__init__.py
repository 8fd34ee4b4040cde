"""Training loops: MAE pre-training (resumable, data-parallel) and its schedules."""

from retfm.training.pretrain import (
    CheckpointMismatchError,
    NonFiniteLossError,
    TrainResult,
    read_checkpoint_extra,
    train_mae,
)

__all__ = [
    "CheckpointMismatchError",
    "NonFiniteLossError",
    "TrainResult",
    "read_checkpoint_extra",
    "train_mae",
]
