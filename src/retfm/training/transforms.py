"""RETFound's adaptation transforms, built with timm's data helpers from the encoder's own
data config (its :class:`~retfm.models.encoder.Preprocessing`).

RETFound (``util/datasets.build_transform``, rmaphoh/RETFound ae9a9ec) trains with
``timm.data.create_transform(input_size, is_training=True, color_jitter=None,
auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25, re_mode="pixel",
re_count=1, mean, std)``: a random resized crop (area 0.08-1, aspect 3/4-4/3, bicubic), a
horizontal flip, RandAugment (2 ops, magnitude 9 +- 0.5, increasing), then random erasing with
per-pixel noise; and evaluates on ``Resize(input / crop_pct)`` + ``CenterCrop(input)`` (bicubic,
``crop_pct`` 224/256 up to 224 px). Downstream images are packed at that resize
(:func:`retfm.data.shards.eval_resize`), so the evaluation view is a centre crop of the packed
image and the training crops start from the same picture RETFound's do, at the packed
resolution (RETFound crops the original file; at 224 px the packed image holds 256 px).

Everything random in these transforms draws from Python's ``random``, NumPy's global generator
(RandAugment's choice of ops) and torch's (random erasing's noise); :func:`seeded` scopes the
first two to one adaptation seed, the caller forks torch's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform

from retfm.models.encoder import Preprocessing
from retfm.settings import AdaptSettings

Transform = Callable[[Image.Image], torch.Tensor]


def data_config(prep: Preprocessing) -> dict:
    """The encoder's timm data config: input size, interpolation, mean, std, crop_pct."""
    return {
        "input_size": (3, prep.img_size, prep.img_size),
        "interpolation": "bicubic",
        "mean": tuple(prep.mean),
        "std": tuple(prep.std),
        "crop_pct": prep.img_size / prep.view_size,
        "crop_mode": "center",
    }


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's ``posterize`` as it ran for RETFound: keeping 0 bits gives a black image. (Pillow
    12 and later refuse 0 bits, which RandAugment's increasing posterize asks for at the
    magnitude limit that m9 with noise 0.5 reaches: the transform would crash.)"""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _old_pillow_posterize(transform: Transform) -> Transform:
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def train_transform(prep: Preprocessing, cfg: AdaptSettings) -> Transform:
    """RETFound's training transform (``is_training=True``) for this encoder."""
    config = data_config(prep)
    return _old_pillow_posterize(
        create_transform(
            input_size=config["input_size"],
            is_training=True,
            color_jitter=None,  # type: ignore[arg-type]  # RETFound passes None (off)
            auto_augment=cfg.auto_augment or None,
            interpolation=config["interpolation"],
            re_prob=cfg.reprob,
            re_mode=cfg.remode,
            re_count=cfg.recount,
            mean=config["mean"],
            std=config["std"],
        )
    )


def train_batch(images_uint8: np.ndarray, transform: Transform) -> torch.Tensor:
    """Packed (B, P, P, 3) uint8 -> (B, 3, S, S) float32, one random draw per image."""
    return torch.stack([transform(Image.fromarray(img)) for img in images_uint8])


@contextmanager
def seeded(seed: int) -> Generator[None, None, None]:
    """Python's ``random`` and NumPy's global generator seeded for the block (timm's
    augmentations draw from them) and put back afterwards; torch's generator is the caller's
    to fork (``torch.random.fork_rng``)."""
    state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
