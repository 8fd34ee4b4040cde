"""Import released RETFound checkpoints (MAE and DINOv2) as first-class retfm encoders, safely.

Released layouts (see STUDY.md):

- MAE (``RETFound_mae_*``): ``{"model": state_dict}`` in timm ``VisionTransformer`` naming,
  ViT-L/16, with the pre-training decoder (``decoder_*``, ``mask_token``) still inside; MAE's
  own training checkpoints add ``optimizer``, ``epoch`` and ``args`` (an argparse Namespace
  whose ``model`` names the architecture, e.g. ``mae_vit_large_patch16``).
- DINOv2 (``RETFound_dinov2_*``): ``{"teacher": state_dict}`` whose backbone keys carry a
  ``backbone.`` prefix, with layer scale (``ls1``/``ls2``), optional register tokens
  (``register_tokens``), a ``mask_token``, blocks possibly chunked (``blocks.<chunk>.<i>.``),
  SwiGLU feed-forwards named ``mlp.w12`` / ``mlp.w3`` (ViT-g), plus the DINO and iBOT heads.
  A plain backbone state dict (as Meta's ``dinov2_vit*14_pretrain.pth``) also imports.

What happens on import (:func:`import_encoder`):

1. The file is read with ``torch.load(weights_only=True, mmap=True)`` (or safetensors): a pickle
   that asks to import or call anything beyond tensors, containers and an argparse Namespace is
   refused before any of it runs, and the tensors stay memory-mapped, so a ViT-L's 1.2 GB are
   never held twice (the encoder is built on the ``meta`` device and takes the mapped tensors;
   :func:`retfm.models.encoder.save_encoder` writes them out one at a time).
2. Every weight the encoder keeps must be finite: a NaN or infinity is refused naming the
   tensor (and no parity figure is ever computed over it).
3. The architecture is read from the checkpoint: widths, depth, patch, grid, registers, layer
   scale and MLP ratio from the tensors' shapes; the head count, which no tensor shape holds,
   from the architecture the checkpoint records (``args.model``), else from ``num_heads`` given
   in params, else from a standard ViT of exactly that width and depth (ViT-S/B/L/H/g); a
   non-standard width with nothing recorded is refused, never guessed.
4. Position embeddings are interpolated to the study's grid as RETFound does
   (``util/pos_embed.interpolate_pos_embed``: bicubic, ``align_corners=False``, prefix tokens
   kept), so a checkpoint made at one input size is used at another.
5. RETFound's feature conventions: an MAE encoder pools the patch tokens through a *fresh*
   ``fc_norm`` (RETFound's fine-tuning model deletes ``norm`` and ``fc_norm`` is missing from
   the checkpoint; a checkpoint that has its own ``fc_norm``, i.e. one already fine-tuned with
   global pooling, keeps it); a DINOv2 encoder is timm's ``vit_*_patch14_dinov2`` (final norm,
   class token).
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from retfm.models.encoder import EncoderSpec, Preprocessing, build_encoder

Recipe = Literal["mae", "dinov2"]
_MAX_LISTED = 5
#: Standard ViTs by (width, depth): their name and attention head count (timm's configs).
STANDARD_VITS: dict[tuple[int, int], tuple[str, int]] = {
    (192, 12): ("ViT-Ti", 3),
    (384, 12): ("ViT-S", 6),
    (768, 12): ("ViT-B", 12),
    (1024, 24): ("ViT-L", 16),
    (1280, 32): ("ViT-H", 16),
    (1536, 40): ("ViT-g", 24),
}
#: Size words of architecture names as MAE / RETFound / DINOv2 record them -> (width, heads).
_NAMED_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16),
                "huge": (1280, 16), "giant": (1536, 24)}  # fmt: skip
_LAYER_SCALE_INIT = 1e-5  # DINOv2's; any non-None value makes timm build LayerScale


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle asks to run code (import or call something) and was refused."""


class CheckpointLayoutError(ValueError):
    """A checkpoint does not have the keys or shapes the named layout requires."""


class NonFiniteWeightsError(ValueError):
    """A checkpoint holds NaN or infinite weights in tensors the encoder would use."""


@dataclass(frozen=True)
class ImportedEncoder:
    """A released checkpoint as an encoder, with what was read and decided on the way."""

    encoder: VisionTransformer
    spec: EncoderSpec
    prep: Preprocessing
    layout: str  # which released layout it was read as
    heads_from: str  # where the attention head count came from
    source_img_size: int  # the input size the checkpoint was made at
    dropped: list[str] = field(default_factory=list)  # checkpoint keys the encoder does not use

    def describe(self) -> str:
        s = self.spec
        resized = (
            f", position embeddings interpolated {self.source_img_size}px -> {s.img_size}px"
            if self.source_img_size != s.img_size
            else ""
        )
        extras = []
        if s.init_values is not None:
            extras.append("layer scale")
        if s.reg_tokens:
            extras.append(f"{s.reg_tokens} register tokens")
        if s.swiglu:
            extras.append("SwiGLU")
        more = f" ({', '.join(extras)})" if extras else ""
        return (
            f"{self.layout}: ViT {s.embed_dim} wide, {s.depth} deep, {s.num_heads} heads "
            f"({self.heads_from}), patch {s.patch_size}{more}{resized}"
        )


# --------------------------------------------------------------------------------- reading
def _listed(keys: Any) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def read_state_dict(path: Path) -> dict[str, Any]:
    """The top-level object of a ``.safetensors`` or torch file, without running any code.

    Torch files in the zip format (every ``torch.save`` since 1.6) are memory-mapped: their
    tensors are read from disk when used, not copied into memory up front.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return dict(load_file(str(path)))
    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: its pickle asks to run code, which a weights file does "
            f"not need (torch.load weights_only=True said: {str(err).splitlines()[0]}). "
            "Only load it with weights_only=False if you trust whoever made it."
        ) from None
    except (RuntimeError, EOFError) as err:
        raise CheckpointLayoutError(f"{path}: not a readable torch checkpoint ({err})") from None
    if not isinstance(obj, dict):
        raise CheckpointLayoutError(f"{path}: expected a dict at the top level, got {type(obj)}")
    return obj


def _is_state(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _unwrap(obj: dict[str, Any], keys: tuple[str, ...], path: Path, layout: str) -> dict:
    """The state dict under the first of ``keys`` present, or ``obj`` itself when it is one."""
    for key in keys:
        if isinstance(obj.get(key), dict):
            return obj[key]
    if _is_state(obj):
        return obj
    wanted = " or ".join(f"{{'{k}': state_dict}}" for k in keys)
    raise CheckpointLayoutError(
        f"{path}: expected a {layout} checkpoint, {wanted} or a plain state dict; top-level "
        f"keys are {_listed(obj.keys())}"
    )


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _require(state: dict[str, torch.Tensor], keys: list[str], path: Path, layout: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointLayoutError(
            f"{path}: not a {layout} checkpoint: missing {_listed(missing)}; it has "
            f"{_listed(state.keys())}"
        )


def check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN or infinite values, naming every tensor that holds them (first few)."""
    bad = []
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            bad.append(f"{name} ({n} of {t.numel()} values)")
    if bad:
        raise NonFiniteWeightsError(
            f"{path}: non-finite weights (NaN or inf) in {len(bad)} tensor(s): "
            f"{', '.join(bad[:_MAX_LISTED])}{' ...' if len(bad) > _MAX_LISTED else ''}; "
            "the file is damaged or was saved from a diverged run"
        )


# ----------------------------------------------------------------------------- architecture
def _depth(state: dict[str, torch.Tensor], prefix: str = "blocks.") -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    ids = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(ids) + 1 if ids else 0


def _grid_side(n_tokens: int, path: Path) -> int:
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise CheckpointLayoutError(f"{path}: pos_embed has {n_tokens} patch tokens, not a square")
    return side


def recorded_heads(obj: dict[str, Any], width: int, path: Path) -> tuple[int, str] | None:
    """The head count the checkpoint records, with where it was read: ``args.num_heads``, or
    the size word of ``args.model`` / ``arch`` (``mae_vit_large_patch16`` -> large -> 16),
    which must then agree with the tensors' width."""
    for key in ("args", "config", "cfg"):
        rec = obj.get(key)
        if isinstance(rec, argparse.Namespace):
            rec = vars(rec)
        if not isinstance(rec, dict):
            continue
        if isinstance(rec.get("num_heads"), int):
            return int(rec["num_heads"]), f"{key}.num_heads"
        for name_key in ("model", "arch", "model_name"):
            name = rec.get(name_key)
            if not isinstance(name, str):
                continue
            for word, (named_width, heads) in _NAMED_SIZES.items():
                if re.search(rf"(?:^|[_\-]){word}\d*(?:[_\-]|$)", name.lower()):
                    if named_width != width:
                        raise CheckpointLayoutError(
                            f"{path}: {key}.{name_key} names {name!r} ({word}: {named_width} "
                            f"wide) but its weights are {width} wide; set num_heads for this FM "
                            "in params.yaml if the file is what you meant to import"
                        )
                    return heads, f"{key}.{name_key} = {name!r}"
    return None


def resolve_heads(
    width: int, depth: int, recorded: tuple[int, str] | None, given: int | None, path: Path
) -> tuple[int, str]:
    """Head count and its source; raises for a non-standard ViT that records nothing."""
    if given is not None:
        heads, source = given, "num_heads from params"
    elif recorded is not None:
        heads, source = recorded[0], f"recorded in the checkpoint: {recorded[1]}"
    elif (width, depth) in STANDARD_VITS:
        name, heads = STANDARD_VITS[(width, depth)]
        source = f"standard {name}: {width} wide, {depth} deep"
    else:
        raise CheckpointLayoutError(
            f"{path}: a ViT {width} wide and {depth} deep is not a standard architecture and "
            "the checkpoint does not record its attention head count; set num_heads for this "
            "FM in params.yaml (study.fms.<name>.num_heads)"
        )
    if width % heads:
        raise CheckpointLayoutError(f"{path}: width {width} is not divisible by {heads} heads "
                                    f"({source})")  # fmt: skip
    return heads, source


def interpolate_pos_embed(pos_embed: torch.Tensor, prefix: int, grid: int) -> torch.Tensor:
    """RETFound's (MAE's) ``interpolate_pos_embed``: the patch part of (1, prefix + g*g, D)
    resized bicubically (``align_corners=False``) to (1, prefix + grid*grid, D); the prefix
    (class token) rows are kept as they are."""
    n = pos_embed.shape[1] - prefix
    old = math.isqrt(n)
    if old == grid:
        return pos_embed
    extra, tokens = pos_embed[:, :prefix], pos_embed[:, prefix:]
    dim = pos_embed.shape[-1]
    tokens = tokens.float().reshape(-1, old, old, dim).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(grid, grid), mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra.float(), tokens), dim=1)


# ------------------------------------------------------------------------------ layouts
def _mae_state(obj: dict[str, Any], path: Path) -> tuple[dict, list[str], str]:
    state = _strip(_unwrap(obj, ("model", "state_dict"), path, "MAE"), "module.")
    _require(
        state,
        ["patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight"],
        path,
        "MAE (timm VisionTransformer)",
    )
    # RETFound's fine-tuning model: no decoder, no mask token, no head, and `norm` deleted
    # (global pooling): fc_norm starts fresh unless the checkpoint brings its own
    drop = ("decoder_", "mask_token", "head.", "norm.")
    kept = {k: v for k, v in state.items() if not k.startswith(drop)}
    return kept, sorted(set(state) - set(kept)), "MAE (RETFound_mae)"


def _unchunk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 trained with ``block_chunks`` names blocks ``blocks.<chunk>.<i>.``; timm wants
    ``blocks.<i>.`` (chunk indices are global, so dropping the chunk number is enough)."""
    pattern = re.compile(r"^blocks\.\d+\.(\d+)\.")
    return {pattern.sub(r"blocks.\1.", k): v for k, v in state.items()}


def _dinov2_state(obj: dict[str, Any], path: Path) -> tuple[dict, list[str], str]:
    raw = _unwrap(obj, ("teacher", "model", "state_dict"), path, "DINOv2")
    layout = "DINOv2 teacher" if "teacher" in obj else "DINOv2 backbone"
    if any(k.startswith(("dino_head.", "ibot_head.")) for k in raw) and not any(
        k.startswith("backbone.") for k in raw
    ):
        raise CheckpointLayoutError(
            f"{path}: DINOv2 heads but no 'backbone.' keys; it has {_listed(raw.keys())}"
        )
    state = _unchunk(_strip(_strip(raw, "module."), "backbone."))
    _require(
        state,
        ["patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.ls1.gamma"],
        path,
        "DINOv2 (ViT with layer scale)",
    )
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith(("mask_token", "head.", "dino_head.", "ibot_head.")):
            continue
        # DINOv2's SwiGLU feed-forward (ViT-g): w12 is timm's packed fc1, w3 its fc2
        k = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", k)
        k = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)
        out["reg_token" if k == "register_tokens" else k] = v
    return out, sorted(set(raw) - {f"backbone.{k}" for k in state} - set(state)), layout


def _spec(
    family: Recipe,
    state: dict[str, torch.Tensor],
    obj: dict[str, Any],
    path: Path,
    img_size: int | None,
    num_heads: int | None,
) -> tuple[EncoderSpec, str, int]:
    proj = state["patch_embed.proj.weight"]  # (D, 3, p, p)
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = _depth(state)
    reg = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    grid = _grid_side(int(state["pos_embed"].shape[1]) - 1, path)  # DINOv2: cls + patches
    source_size = grid * patch
    size = img_size or source_size
    if size % patch:
        raise CheckpointLayoutError(
            f"{path}: input size {size}px is not a multiple of the checkpoint's patch {patch}px "
            "(choose pack.image_size so that every FM's patch divides it, e.g. 224)"
        )
    fc1 = state["blocks.0.mlp.fc1.weight"]
    swiglu = "blocks.0.mlp.fc2.weight" in state and (
        state["blocks.0.mlp.fc2.weight"].shape[1] * 2 == fc1.shape[0]
    )
    recorded = recorded_heads(obj, dim, path) if num_heads is None else None
    heads, heads_from = resolve_heads(dim, depth, recorded, num_heads, path)
    dinov2 = family == "dinov2"
    spec = EncoderSpec(
        family=family,
        img_size=size,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=fc1.shape[0] / dim,
        swiglu=swiglu,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        init_values=_LAYER_SCALE_INIT if "blocks.0.ls1.gamma" in state else None,
        reg_tokens=reg,
        no_embed_class=reg > 0,
        global_pool="token" if dinov2 else "avg",
        fc_norm=not dinov2,
    )
    return spec, heads_from, source_size


def _to_timm(state: dict[str, torch.Tensor], spec: EncoderSpec) -> dict[str, torch.Tensor]:
    """Position embeddings to the target grid, and DINOv2's register layout to timm's: with
    registers, timm's model has no position row for the class token, so DINOv2's is added to
    the class token itself (exactly what DINOv2 computes)."""
    state = dict(state)
    pos = state["pos_embed"]
    if spec.no_embed_class:
        state["cls_token"] = state["cls_token"].float() + pos[:, :1].float()
        state["pos_embed"] = interpolate_pos_embed(pos[:, 1:], 0, spec.grid)
    else:
        state["pos_embed"] = interpolate_pos_embed(pos, 1, spec.grid)
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Fill a ``meta``-device model with ``state`` (no copy), or list what does not fit."""
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
            shapes = ", ".join(
                f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in wrong[:3]
            )
            parts.append(f"wrong shape {shapes}")
        raise CheckpointLayoutError(f"{path}: weights do not fit the model: {'; '.join(parts)}")
    # float32 like every retfm encoder; a no-op (no copy) for float32 tensors
    typed = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(typed, strict=True, assign=True)


def import_encoder(
    path: Path,
    recipe: Recipe,
    *,
    img_size: int | None = None,
    num_heads: int | None = None,
) -> ImportedEncoder:
    """A released MAE or DINOv2 checkpoint as a retfm encoder (eval mode) at ``img_size``
    (default: the size it was made at). Raises :class:`UnsafeCheckpointError`,
    :class:`CheckpointLayoutError` or :class:`NonFiniteWeightsError` with the file named."""
    path = Path(path)
    if recipe not in ("mae", "dinov2"):
        raise ValueError(f"recipe must be 'mae' or 'dinov2', got {recipe!r}")
    obj = read_state_dict(path)
    state, dropped, layout = (_mae_state if recipe == "mae" else _dinov2_state)(obj, path)
    check_finite(state, path)
    spec, heads_from, source_size = _spec(recipe, state, obj, path, img_size, num_heads)
    state = _to_timm(state, spec)
    encoder = build_encoder(spec, device="meta")
    if spec.fc_norm and "fc_norm.weight" not in state:  # RETFound: a fresh LayerNorm
        state["fc_norm.weight"] = torch.ones(spec.embed_dim)
        state["fc_norm.bias"] = torch.zeros(spec.embed_dim)
    _load_strict(encoder, state, path)
    encoder.eval()
    prep = Preprocessing.retfound(spec.img_size)  # ImageNet statistics, as RETFound uses
    return ImportedEncoder(encoder, spec, prep, layout, heads_from, source_size, dropped)


def load_mae_pretraining_weights(mae: nn.Module, path: Path) -> None:
    """Load an MAE ``{"model": ...}`` checkpoint into a :class:`MaskedAutoencoder` (encoder,
    MAE's final norm and decoder) to continue pre-training from it, as RETFound continued from
    ImageNet MAE; position tables are interpolated to the model's grid."""
    path = Path(path)
    obj = read_state_dict(path)
    state = _strip(_unwrap(obj, ("model", "state_dict"), path, "MAE"), "module.")
    check_finite(state, path)
    own = mae.state_dict()
    full: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith(("decoder_", "mask_token")):
            full[k] = v
        elif k.startswith("norm."):
            full[k] = v  # MAE's final token norm
        elif not k.startswith(("head.", "fc_norm.")):
            full[f"encoder.{k}"] = v
    grid = int(getattr(mae, "grid"))  # noqa: B009 - MaskedAutoencoder.grid
    for key in ("encoder.pos_embed", "decoder_pos_embed"):
        if key in full:
            full[key] = interpolate_pos_embed(full[key], 1, grid)
    for k in own:  # what the file lacks keeps our init: fc_norm (fresh), an absent decoder
        if k.startswith("encoder.fc_norm.") or (
            not any(f.startswith("decoder_") for f in full)
            and k.startswith(("decoder_", "mask_token"))
        ):
            full[k] = own[k]
    missing = sorted(set(own) - set(full))
    unexpected = sorted(set(full) - set(own))
    wrong = sorted(k for k in set(own) & set(full) if own[k].shape != full[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointLayoutError(
            f"{path}: weights do not fit the MAE model: missing {_listed(missing)}; unexpected "
            f"{_listed(unexpected)}; wrong shape {_listed(wrong)}"
        )
    mae.load_state_dict({k: v.to(own[k].dtype) for k, v in full.items()}, strict=True)


def import_checkpoint(path: Path, kind: Recipe) -> tuple[nn.Module, Preprocessing]:
    """Import a released RETFound checkpoint as an encoder (eval mode) and its preprocessing
    (shorthand for :func:`import_encoder` at the checkpoint's own input size)."""
    imported = import_encoder(path, kind)
    return imported.encoder, imported.prep
