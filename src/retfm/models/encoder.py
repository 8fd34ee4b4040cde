"""The FM encoder: a timm VisionTransformer, plus the preprocessing that travels with it.

Features follow RETFound: global-average-pooled patch tokens through a norm layer (``fc_norm``),
i.e. ``encoder.forward_head(encoder.forward_features(x), pre_logits=True)`` -> (B, embed_dim).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from retfm.settings import ModelPreset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How raw uint8 RGB images become encoder input: resize/crop to ``img_size``, then
    ``(x / 255 - mean) / std`` per channel. Stored beside the weights so inference never guesses."""

    img_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        raw = json.loads(text)
        return cls(img_size=int(raw["img_size"]), mean=tuple(raw["mean"]), std=tuple(raw["std"]))

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, normalised."""
        x = images_uint8.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def build_encoder(
    arch: ModelPreset, *, num_classes: int = 0, drop_path: float = 0.0
) -> VisionTransformer:
    """A timm ViT shaped by ``arch``; ``num_classes=0`` gives the feature extractor."""
    return VisionTransformer(
        img_size=arch.img_size,
        patch_size=arch.patch_size,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        global_pool="avg",
        fc_norm=True,
        num_classes=num_classes,
        drop_path_rate=drop_path,
    )


def encode(encoder: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, embed_dim) pooled, normed features."""
    return encoder.forward_head(encoder.forward_features(x), pre_logits=True)


def save_encoder(
    path: Path,
    encoder: VisionTransformer,
    arch: ModelPreset,
    prep: Preprocessing,
    extra: dict[str, str] | None = None,
) -> Path:
    """Weights as safetensors (no pickle), with arch and preprocessing in the header metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"arch": arch.model_dump_json(), "preprocessing": prep.to_json(), **(extra or {})}
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    canonical_safetensors(tmp)
    tmp.replace(path)
    return path


def canonical_safetensors(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place.

    safetensors writes its header map (tensors and ``__metadata__``) in an order that varies
    from one process to the next, so saving the same weights twice gave different bytes (and a
    DVC output that changed on every rerun). Sorting keeps the header's length, so the data
    offsets do not move.
    """
    with path.open("r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        header = {k: (dict(sorted(v.items())) if k == "__metadata__" else v)
                  for k, v in sorted(header.items())}  # fmt: skip
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > size:
            raise ValueError(f"{path}: canonical safetensors header is longer than the original")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def load_encoder(
    path: Path,
) -> tuple[VisionTransformer, ModelPreset, Preprocessing, dict[str, str]]:
    """Rebuild an encoder saved by :func:`save_encoder` (eval mode)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "arch" not in meta or "preprocessing" not in meta:
        raise ValueError(f"{path}: not a retfm encoder file (no arch/preprocessing metadata)")
    arch = ModelPreset.model_validate_json(meta["arch"])
    prep = Preprocessing.from_json(meta["preprocessing"])
    encoder = build_encoder(arch)
    encoder.load_state_dict(load_file(str(path)), strict=True)
    encoder.eval()
    return encoder, arch, prep, meta
