"""A downstream classifier: the FM encoder plus a task head, one module that maps normalised
images to class probabilities.

Both adaptation methods end in this one shape, so ONNX export, the registry and evaluation never
need to know whether the encoder was frozen (linear probe) or trained (fine-tune).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from retfm.models.encoder import Preprocessing, encode


def probe_head(embed_dim: int, num_classes: int) -> nn.Sequential:
    """The MAE / RETFound linear-probe head: (B, D) -> (B, K) logits.

    A parameter-free BatchNorm whitens the features first (MAE found that frozen MAE features
    vary widely in scale), so the probe stays a linear map that one learning rate suits.
    """
    linear = nn.Linear(embed_dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), linear)


class Classifier(nn.Module):
    """encoder + head: (B, 3, S, S) normalised float32 -> (B, K) probabilities (softmax).

    ``classes`` (index -> class name) and ``prep`` (how raw pixels become the input) travel with
    the module so that whoever exports or serves it has everything in one object.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        head: nn.Module,
        *,
        classes: Sequence[str] | None = None,
        prep: Preprocessing | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(encoder.head, nn.Identity):
            raise ValueError(
                "encoder still has its own classification head; use Classifier.from_vit for a "
                "fine-tuned ViT, or build the encoder with num_classes=0"
            )
        self.encoder = encoder
        self.head = head
        self.classes = tuple(classes) if classes is not None else None
        self.prep = prep

    @classmethod
    def from_probe(
        cls,
        encoder: VisionTransformer,
        head: nn.Module,
        *,
        classes: Sequence[str] | None = None,
        prep: Preprocessing | None = None,
    ) -> Classifier:
        """A frozen encoder plus a head trained on its features (e.g. :func:`probe_head`)."""
        for p in encoder.parameters():
            p.requires_grad_(False)
        return cls(encoder, head, classes=classes, prep=prep).eval()

    @classmethod
    def from_vit(
        cls,
        vit: VisionTransformer,
        *,
        classes: Sequence[str] | None = None,
        prep: Preprocessing | None = None,
    ) -> Classifier:
        """A ViT fine-tuned with its own timm head (``num_classes=K``): the head moves out of the
        ViT into the classifier, so ``encoder`` is again a pure feature extractor."""
        if isinstance(vit.head, nn.Identity):
            raise ValueError("vit has no classification head (num_classes=0)")
        head = vit.head
        vit.reset_classifier(0)
        return cls(vit, head, classes=classes, prep=prep).eval()

    @property
    def num_classes(self) -> int:
        out = [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1]
        return int(out.out_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, D) pooled, normed encoder features."""
        return encode(self.encoder, x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, K) logits."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, K) class probabilities, rows summing to 1."""
        return self.logits(x).softmax(dim=-1)
