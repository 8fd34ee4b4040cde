"""The one interface every image consumer reads through: a random-access set of uint8 images."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ImageSource(Protocol):
    """Random access to N equally sized RGB images, uint8, shape (H, W, 3) each."""

    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Images at ``indices`` as one uint8 array of shape (len(indices), H, W, 3)."""
        ...


class ArrayImages:
    """An :class:`ImageSource` over an in-memory (or memory-mapped) uint8 array."""

    def __init__(self, array: np.ndarray) -> None:
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3), got {array.dtype} {array.shape}")
        self.array = array

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def take(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[np.asarray(indices)])
