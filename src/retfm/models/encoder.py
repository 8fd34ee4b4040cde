"""The FM encoder: a timm VisionTransformer, plus the preprocessing that travels with it.

Every FM, pre-trained here or imported, MAE or DINOv2, is one timm ``VisionTransformer``
described by an :class:`EncoderSpec` (widths, depth, heads, layer scale, register tokens,
pooling), which is stored in the weights file's header so that it is never guessed again.
Features are ``encoder.forward_head(encoder.forward_features(x), pre_logits=True)`` ->
(B, embed_dim), pooled the way RETFound pools each family:

- MAE (``global_pool="avg"``, ``fc_norm=True``): the mean of the patch tokens through a fresh
  LayerNorm (``fc_norm``), RETFound's ``models_vit.VisionTransformer(global_pool=True)``;
- DINOv2 (``global_pool="token"``): the class token after the final norm, timm's
  ``vit_*_patch14_dinov2`` as RETFound builds it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from retfm.data.shards import eval_resize
from retfm.settings import ModelPreset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How raw uint8 RGB images become encoder input, stored beside the weights so inference
    never guesses: crop a fundus photo to its field of view and pad it square
    (``fundus_crop``, :mod:`retfm.data.fundus`), resize the shorter side to ``resize`` (bicubic)
    and crop the centre ``img_size`` square (RETFound's evaluation view, :func:`eval_resize`),
    then ``(x / 255 - mean) / std`` per channel. Downstream task images are packed at
    ``resize``; :meth:`center_crop` takes the view from them."""

    img_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: int = 0  # 0: img_size (no margin: files written before the RETFound view)
    fundus_crop: bool = False

    @classmethod
    def retfound(
        cls,
        img_size: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        *,
        fundus_crop: bool = False,
    ) -> Preprocessing:
        """RETFound's evaluation view at ``img_size`` (resize to :func:`eval_resize`)."""
        return cls(img_size, mean, std, eval_resize(img_size), fundus_crop)

    @property
    def view_size(self) -> int:
        """The side images are packed at before the centre crop."""
        return self.resize or self.img_size

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        raw = json.loads(text)
        return cls(
            img_size=int(raw["img_size"]),
            mean=tuple(raw["mean"]),
            std=tuple(raw["std"]),
            resize=int(raw.get("resize", 0)),
            fundus_crop=bool(raw.get("fundus_crop", False)),
        )

    def center_crop(self, images_uint8: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) -> the centre (B, S, S, 3), offsets as torchvision's ``CenterCrop``;
        images already at ``img_size`` are returned as they are."""
        h, w = images_uint8.shape[1:3]
        s = self.img_size
        if (h, w) == (s, s):
            return images_uint8
        if h < s or w < s:
            raise ValueError(f"images of {h}x{w} px are smaller than the {s} px input")
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        return images_uint8[:, top : top + s, left : left + s]

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, normalised."""
        x = images_uint8.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def eval_batch(self, images_uint8: np.ndarray) -> torch.Tensor:
        """Packed (B, P, P, 3) uint8 -> the normalised centre view (B, 3, S, S)."""
        view = np.ascontiguousarray(self.center_crop(images_uint8))
        return self.normalise(torch.from_numpy(view))


class EncoderSpec(BaseModel):
    """The timm ``VisionTransformer`` an FM's weights fit, and how its features are pooled.

    Read from a checkpoint's tensors (widths, depth, patch, grid, layer scale, registers) and
    its recorded architecture (head count); see :mod:`retfm.models.checkpoints`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str = "mae"  # the recipe that made it: mae | dinov2
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    swiglu: bool = False  # DINOv2 ViT-g's packed SwiGLU feed-forward (mlp.w12 / mlp.w3)
    qkv_bias: bool = True
    init_values: float | None = None  # layer scale (DINOv2); None: no LayerScale modules
    reg_tokens: int = 0
    no_embed_class: bool = False  # position embeddings for patches only (DINOv2 + registers)
    global_pool: str = "avg"  # avg: mean of patch tokens (MAE) | token: class token (DINOv2)
    fc_norm: bool = True  # the norm after pooling (avg); False: the final norm before it

    @classmethod
    def from_preset(cls, arch: ModelPreset) -> EncoderSpec:
        """The encoder half of a pre-training preset (an MAE ViT as RETFound fine-tunes it)."""
        return cls(
            img_size=arch.img_size,
            patch_size=arch.patch_size,
            embed_dim=arch.embed_dim,
            depth=arch.depth,
            num_heads=arch.num_heads,
        )

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def timm_kwargs(self) -> dict:
        """Keyword arguments of ``timm.models.vision_transformer.VisionTransformer``."""
        extra: dict = {}
        if self.swiglu:
            extra = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}
        if self.init_values is not None:
            extra["init_values"] = self.init_values
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "reg_tokens": self.reg_tokens,
            "no_embed_class": self.no_embed_class,
            "global_pool": self.global_pool,
            "fc_norm": self.fc_norm,
            **extra,
        }


def as_spec(arch: ModelPreset | EncoderSpec) -> EncoderSpec:
    return arch if isinstance(arch, EncoderSpec) else EncoderSpec.from_preset(arch)


def build_encoder(
    arch: ModelPreset | EncoderSpec,
    *,
    num_classes: int = 0,
    drop_path: float = 0.0,
    device: str | torch.device | None = None,
) -> VisionTransformer:
    """A timm ViT shaped by ``arch`` (a pre-training preset or an :class:`EncoderSpec`);
    ``num_classes=0`` gives the feature extractor. ``device="meta"`` builds it without
    allocating weights (to be filled with ``load_state_dict(..., assign=True)``)."""
    kwargs = as_spec(arch).timm_kwargs()
    with torch.device(device) if device is not None else torch.device("cpu"):
        return VisionTransformer(**kwargs, num_classes=num_classes, drop_path_rate=drop_path)


def encode(encoder: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, embed_dim) pooled, normed features."""
    return encoder.forward_head(encoder.forward_features(x), pre_logits=True)


def save_encoder(
    path: Path,
    encoder: VisionTransformer,
    arch: ModelPreset | EncoderSpec,
    prep: Preprocessing,
    extra: dict[str, str] | None = None,
) -> Path:
    """Weights as safetensors (no pickle), with the :class:`EncoderSpec` and preprocessing in
    the header metadata. Written tensor by tensor (:func:`write_safetensors`), so a ViT-L's
    1.2 GB are never copied into memory a second time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"encoder": as_spec(arch).model_dump_json(), "preprocessing": prep.to_json(),
            **(extra or {})}  # fmt: skip
    tmp = path.with_suffix(path.suffix + ".tmp")
    write_safetensors(encoder.state_dict(), tmp, meta)
    tmp.replace(path)
    return path


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
           torch.bool: "BOOL"}  # fmt: skip


def write_safetensors(
    state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file written one tensor at a time, header keys sorted (byte-identical for
    identical weights; ``safetensors.torch.save_file`` first copies every tensor into one
    in-memory buffer, and orders its header differently from one process to the next)."""
    tensors = {k: v.detach() for k, v in sorted(state.items())}
    header: dict = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    header = dict(sorted(header.items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with Path(path).open("wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for t in tensors.values():
            flat = t.contiguous().reshape(-1)
            if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: write its bits
                flat = flat.view(torch.int16)
            f.write(flat.cpu().numpy().tobytes())


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


def read_encoder_header(path: Path) -> tuple[EncoderSpec, Preprocessing, dict[str, str]]:
    """The spec, preprocessing and metadata of an encoder file, without reading its weights."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "preprocessing" not in meta or not ("encoder" in meta or "arch" in meta):
        raise ValueError(f"{path}: not a retfm encoder file (no encoder/preprocessing metadata)")
    if "encoder" in meta:
        spec = EncoderSpec.model_validate_json(meta["encoder"])
    else:  # written before EncoderSpec: an MAE pre-training preset
        spec = EncoderSpec.from_preset(ModelPreset.model_validate_json(meta["arch"]))
    return spec, Preprocessing.from_json(meta["preprocessing"]), meta


def load_encoder(
    path: Path,
) -> tuple[VisionTransformer, EncoderSpec, Preprocessing, dict[str, str]]:
    """Rebuild an encoder saved by :func:`save_encoder` (eval mode)."""
    spec, prep, meta = read_encoder_header(Path(path))
    encoder = build_encoder(spec, device="meta")
    encoder.load_state_dict(load_file(str(path)), strict=True, assign=True)
    encoder.eval()
    return encoder, spec, prep, meta
