"""Pre-training recipes: what one step of pre-training computes, behind one small interface.

The loop (:mod:`retfm.training.pretrain`) owns everything a recipe should not have to think
about: data order, micro-batches and accumulation, bf16 autocast, DDP, checkpoints, exact resume,
the non-finite loss stop, progress and metrics. A recipe says

- :meth:`Recipe.build`: the module that trains, holding every tensor a checkpoint must keep
  (for DINOv2: student, EMA teacher and the loss centres);
- :meth:`Recipe.optimizer` and :meth:`Recipe.schedule`: its optimiser and the per-iteration
  values (learning rate, weight decay, ...) as pure functions of training progress, so a resumed
  run lands on exactly the values an uninterrupted one used;
- :meth:`Recipe.loss`: one micro-batch, from packed uint8 images to a loss and its statistics;
- :meth:`Recipe.before_step` / :meth:`Recipe.after_step`: gradient rules and updates around the
  optimiser step (clipping, a frozen last layer, the teacher's EMA);
- :meth:`Recipe.check`: stop with a clear message when training has gone wrong (collapse);
- :meth:`Recipe.encoder` and :meth:`Recipe.spec`: the ViT that becomes the FM and its spec.

A recipe is the module ``retfm.training.recipes.<name>`` exporting ``RECIPE`` (a subclass of
:class:`Recipe`), with its settings section ``pretrain.<name>`` in
:class:`retfm.settings.PretrainSettings`; adding a recipe touches nothing else.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from retfm.models.encoder import EncoderSpec, Preprocessing
from retfm.settings import TRAINABLE_RECIPES, ModelPreset, PretrainSettings


@dataclass(frozen=True)
class Progress:
    """Where training is: ``epoch`` fractional (2.5 = half-way through the third), ``step`` the
    optimiser steps done, out of ``total_steps`` (``steps_per_epoch`` each epoch)."""

    epoch: float
    step: int
    total_steps: int
    steps_per_epoch: int
    total_epochs: int


class Recipe(ABC):
    """One pre-training recipe; see the module docstring for the contract."""

    name: ClassVar[str]

    def __init__(
        self,
        pretrain: PretrainSettings,
        arch: ModelPreset,
        prep: Preprocessing,
        *,
        images_per_step: int,
    ) -> None:
        self.pretrain, self.arch, self.prep = pretrain, arch, prep
        self.cfg: Any = pretrain.recipe_settings(self.name)
        self.images_per_step = images_per_step  # over every process and micro-batch

    @abstractmethod
    def build(self) -> nn.Module:
        """The module that trains (on the CPU; the loop moves it)."""

    @abstractmethod
    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Its optimiser, with per-group ``lr_scale`` / ``wd_scale`` where the recipe uses them."""

    @abstractmethod
    def schedule(self, optimizer: torch.optim.Optimizer, at: Progress) -> dict[str, float]:
        """Set this iteration's values on the optimiser; return them (``lr`` at least)."""

    @abstractmethod
    def loss(
        self, net: nn.Module, images: torch.Tensor, at: Progress
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(B, H, W, 3) uint8 images on the device -> the loss and statistics to log. ``net``
        is the built module, wrapped in DDP under ``torchrun``: call it, not its parts."""

    def before_step(self, model: nn.Module, at: Progress) -> dict[str, float]:
        """After the gradients are complete, before the optimiser step."""
        return {}

    def after_step(self, model: nn.Module, at: Progress) -> dict[str, float]:
        """After the optimiser step."""
        return {}

    def check(self, stats: dict[str, float], at: Progress) -> None:  # noqa: B027 (optional)
        """Raise when the logged statistics (means over the last window) say training failed."""

    @abstractmethod
    def encoder(self, model: nn.Module) -> VisionTransformer:
        """The ViT that becomes the FM (for DINOv2 the teacher's)."""

    @abstractmethod
    def spec(self) -> ModelPreset | EncoderSpec:
        """What the saved encoder is, for :func:`retfm.models.encoder.save_encoder`."""


def recipe_class(name: str) -> type[Recipe]:
    """The recipe called ``name`` (``mae``, ``dinov2``), imported only when used."""
    if name not in TRAINABLE_RECIPES:
        raise ValueError(f"no pre-training recipe {name!r}; trainable: {list(TRAINABLE_RECIPES)}")
    cls = importlib.import_module(f"retfm.training.recipes.{name}").RECIPE
    if not (isinstance(cls, type) and issubclass(cls, Recipe) and cls.name == name):
        raise TypeError(f"retfm.training.recipes.{name}.RECIPE is not a Recipe named {name!r}")
    return cls
