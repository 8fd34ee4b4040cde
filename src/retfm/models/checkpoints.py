"""Import released RETFound checkpoints (MAE and DINOv2) as timm encoders, safely.

Released layouts (see STUDY.md):

- MAE: ``{"model": state_dict}`` in timm ``VisionTransformer`` naming, ViT-L/16, with the
  pre-training decoder (``decoder_*``, ``mask_token``) still inside.
- DINOv2: ``{"teacher": state_dict}`` whose backbone keys carry a ``backbone.`` prefix and match
  timm's ``vit_large_patch14_dinov2`` (layer scale ``ls1``/``ls2``), plus DINO/iBOT heads.

Files are read with ``torch.load(weights_only=True)`` (or safetensors): a pickle that asks to
import or call anything beyond tensors and containers is refused before any of it runs.

Why MAE's ``norm.*`` becomes ``fc_norm.*``: our encoders pool the patch tokens and then apply
``fc_norm`` (timm drops ``norm`` in that mode), and our own MAE pre-training trains exactly that
module as the last token norm. Mapping the released ``norm`` onto ``fc_norm`` gives imported and
home-trained FMs one feature definition, and keeps the learned per-channel scale and shift
instead of an untrained identity affine. (RETFound's fine-tuning code instead starts ``fc_norm``
afresh; pass ``fc_norm_from="fresh"`` to get that behaviour.)
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from safetensors.torch import load_file
from timm.data import resolve_model_data_config
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from retfm.models.encoder import Preprocessing, build_encoder
from retfm.settings import ModelPreset

# Head counts of the standard ViT widths; head_dim 64 otherwise (the widths cannot tell).
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}
_MAX_LISTED = 5


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle asks to run code (import or call something) and was refused."""


class CheckpointLayoutError(ValueError):
    """A checkpoint does not have the keys or shapes the named layout requires."""


def read_state_dict(path: Path) -> dict[str, Any]:
    """The top-level object of a ``.safetensors`` or torch file, without running any code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return dict(load_file(str(path)))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: its pickle asks to run code, which a weights file does "
            f"not need (torch.load weights_only=True said: {str(err).splitlines()[0]}). "
            "Only load it with weights_only=False if you trust whoever made it."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointLayoutError(f"{path}: expected a dict at the top level, got {type(obj)}")
    return obj


def _listed(keys: Any) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _unwrap(obj: dict[str, Any], key: str, path: Path) -> dict[str, torch.Tensor]:
    if key not in obj or not isinstance(obj[key], dict):
        raise CheckpointLayoutError(
            f"{path}: expected a {{'{key}': state_dict}} checkpoint; top-level keys are "
            f"{_listed(obj.keys())}"
        )
    return obj[key]


def _require(state: dict[str, torch.Tensor], keys: list[str], path: Path, layout: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointLayoutError(
            f"{path}: not a {layout} checkpoint: missing {_listed(missing)}; it has "
            f"{_listed(state.keys())}"
        )


def _heads(width: int) -> int:
    return _HEADS_BY_WIDTH.get(width, max(1, width // 64))


def _depth(state: dict[str, torch.Tensor], prefix: str = "blocks.") -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    ids = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(ids) + 1 if ids else 0


def _grid_side(n_tokens: int, path: Path) -> int:
    side = round(n_tokens**0.5)
    if side * side != n_tokens:
        raise CheckpointLayoutError(f"{path}: pos_embed has {n_tokens} patch tokens, not a square")
    return side


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listed(unexpected)}")
        if wrong:
            parts.append(
                "wrong shape "
                + ", ".join(
                    f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in wrong[:3]
                )
            )
        raise CheckpointLayoutError(f"{path}: weights do not fit the model: {'; '.join(parts)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


# ---------------------------------------------------------------------------------- MAE
def mae_arch(state: dict[str, torch.Tensor], path: Path) -> ModelPreset:
    """The :class:`ModelPreset` of an MAE state dict (widths, depths and image size from the
    keys; head counts from the standard ViT widths)."""
    _require(
        state,
        ["patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight"],
        path,
        "MAE (timm VisionTransformer)",
    )
    proj = state["patch_embed.proj.weight"]  # (D, 3, p, p)
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    grid = _grid_side(int(state["pos_embed"].shape[1]) - 1, path)
    dec = state.get("decoder_embed.weight")
    dec_dim = int(dec.shape[0]) if dec is not None else 512
    dec_depth = _depth(state, "decoder_blocks.") or 8
    return ModelPreset(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=_depth(state),
        num_heads=_heads(dim),
        decoder_embed_dim=dec_dim,
        decoder_depth=dec_depth,
        decoder_num_heads=16 if dec_dim % 16 == 0 else _heads(dec_dim),
    )


def _mae_encoder_state(
    state: dict[str, torch.Tensor], fc_norm_from: Literal["norm", "fresh"]
) -> dict[str, torch.Tensor]:
    drop = ("decoder_", "mask_token", "head.")
    out = {k: v for k, v in state.items() if not k.startswith(drop)}
    norm: dict[str, torch.Tensor] = {
        k: out.pop(k) for k in ("norm.weight", "norm.bias") if k in out
    }
    fc: dict[str, torch.Tensor] = {
        k: out.pop(k) for k in ("fc_norm.weight", "fc_norm.bias") if k in out
    }
    if fc:  # already fine-tuned with global pooling: its own fc_norm wins
        out.update(fc)
    elif fc_norm_from == "norm" and norm:
        out.update({k.replace("norm.", "fc_norm.", 1): v for k, v in norm.items()})
    return out


def import_mae(
    path: Path, *, fc_norm_from: Literal["norm", "fresh"] = "norm"
) -> tuple[VisionTransformer, ModelPreset, Preprocessing]:
    """A released MAE checkpoint as the project's encoder (``build_encoder``), with its arch."""
    state = _unwrap(read_state_dict(path), "model", path)
    arch = mae_arch(state, path)
    encoder = build_encoder(arch)
    enc_state = _mae_encoder_state(state, fc_norm_from)
    if fc_norm_from == "fresh" and "fc_norm.weight" not in enc_state:
        fresh = encoder.fc_norm.state_dict()  # LayerNorm's own init: weight 1, bias 0
        enc_state.update({f"fc_norm.{k}": v.clone() for k, v in fresh.items()})
    _load_strict(encoder, enc_state, path)
    encoder.eval()
    return encoder, arch, Preprocessing(img_size=arch.img_size)


def load_mae_pretraining_weights(mae: nn.Module, path: Path) -> None:
    """Load an MAE ``{"model": ...}`` checkpoint into a :class:`MaskedAutoencoder` (encoder and
    decoder) to continue pre-training from it, as RETFound continued from ImageNet MAE."""
    path = Path(path)
    state = _unwrap(read_state_dict(path), "model", path)
    enc = _mae_encoder_state(state, "norm")
    full = {f"encoder.{k}": v for k, v in enc.items()}
    full.update({k: v for k, v in state.items() if k.startswith(("decoder_", "mask_token"))})
    own = mae.state_dict()
    if not any(k.startswith("decoder_") for k in full):  # an encoder-only file: keep our decoder
        full.update({k: v for k, v in own.items() if not k.startswith("encoder.")})
    _load_strict(mae, full, path)


# ------------------------------------------------------------------------------- DINOv2
def _unchunk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 trained with ``block_chunks`` names blocks ``blocks.<chunk>.<i>.``; timm wants
    ``blocks.<i>.`` (chunk indices are global, so dropping the chunk number is enough)."""
    pattern = re.compile(r"^blocks\.\d+\.(\d+)\.")
    return {pattern.sub(r"blocks.\1.", k): v for k, v in state.items()}


def import_dinov2(path: Path) -> tuple[VisionTransformer, Preprocessing]:
    """A released DINOv2 teacher checkpoint as timm's ``vit_large_patch14_dinov2`` family
    (built with ``pretrained=False``: nothing is downloaded)."""
    teacher = _unwrap(read_state_dict(path), "teacher", path)
    backbone = {k[len("backbone.") :]: v for k, v in teacher.items() if k.startswith("backbone.")}
    if not backbone:
        raise CheckpointLayoutError(
            f"{path}: no 'backbone.' keys in 'teacher'; it has {_listed(teacher.keys())}"
        )
    backbone = _unchunk(backbone)
    _require(
        backbone,
        ["patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.ls1.gamma"],
        path,
        "DINOv2 (ViT with layer scale)",
    )
    proj = backbone["patch_embed.proj.weight"]
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    reg = int(backbone["register_tokens"].shape[1]) if "register_tokens" in backbone else 0
    grid = _grid_side(int(backbone["pos_embed"].shape[1]) - 1, path)
    model = timm.create_model(
        "vit_large_patch14_dinov2",
        pretrained=False,
        num_classes=0,
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=_depth(backbone),
        num_heads=_heads(dim),
        reg_tokens=reg,
        no_embed_class=reg > 0,
    )
    assert isinstance(model, VisionTransformer)
    # timm's filter recognises the DINOv2 layout by its mask_token, then renames SwiGLU-free
    # w12/w3 to fc1/fc2, moves register tokens and drops the mask token.
    backbone.setdefault("mask_token", torch.zeros(1, dim))
    state = checkpoint_filter_fn(backbone, model)
    _load_strict(model, state, path)
    model.eval()
    cfg = resolve_model_data_config(model)
    prep = Preprocessing(img_size=grid * patch, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    return model, prep


def import_checkpoint(
    path: Path, kind: Literal["mae", "dinov2"]
) -> tuple[nn.Module, Preprocessing]:
    """Import a released RETFound checkpoint as a timm encoder (eval mode) and its
    preprocessing. Raises :class:`UnsafeCheckpointError` for pickles that would run code and
    :class:`CheckpointLayoutError` for a file that is not the named layout."""
    path = Path(path)
    if kind == "mae":
        encoder, _, prep = import_mae(path)
        return encoder, prep
    if kind == "dinov2":
        return import_dinov2(path)
    raise ValueError(f"kind must be 'mae' or 'dinov2', got {kind!r}")
