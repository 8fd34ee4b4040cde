"""Stand-in checkpoints in the study's released layouts, with random weights.

The four released FMs (``RETFound_mae_meh``, ``RETFound_mae_shanghai``,
``RETFound_dinov2_meh``, ``RETFound_dinov2_shanghai``) are gated downloads. These files have
exactly their layouts, so the four-FM study (``profiles/four-fms.yaml``) runs on a laptop before
the real weights arrive, and the importer is tested against them:

- MAE: ``{"model": state}``: facebookresearch/mae's ``MaskedAutoencoderViT`` (timm key names,
  MAE's final ``norm``, the decoder and ``mask_token``), made at 224 px, patch 16;
- DINOv2: ``{"teacher": state}``: the backbone in DINOv2's own naming under ``backbone.``
  (``ls1``/``ls2`` layer scale, ``mask_token``, optionally ``register_tokens``, block chunks, or
  SwiGLU ``mlp.w12``/``mlp.w3``), plus DINO and iBOT head keys, made at 224 px, patch 14.

Weights are random (seeded): a study on them measures nothing about retinas; the results say
only that the machinery works.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer

RELEASED = ("RETFound_mae_meh", "RETFound_mae_shanghai", "RETFound_dinov2_meh",
            "RETFound_dinov2_shanghai")  # fmt: skip


def mae_release(
    path: Path,
    *,
    dim: int = 1024,
    depth: int = 24,
    heads: int = 16,
    img: int = 224,
    seed: int = 0,
    record_heads: bool = False,
    extra: dict | None = None,
) -> Path:
    """An MAE pre-training checkpoint as RETFound_mae_* ships it. ``record_heads`` adds MAE's
    ``args`` (an argparse Namespace) with ``num_heads``, as MAE's own training checkpoints do."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=img, patch_size=16, embed_dim=dim, depth=depth,
                            num_heads=heads, global_pool="token", num_classes=0)  # fmt: skip
    state = dict(vit.state_dict())
    with torch.no_grad():  # non-trivial weights where a wrong mapping would show
        state["norm.weight"].uniform_(0.5, 1.5)
        state["norm.bias"].uniform_(-0.5, 0.5)
        state["pos_embed"].normal_(0, 0.5)
    dec = Block(128, 4, qkv_bias=True)
    state.update({f"decoder_blocks.0.{k}": v for k, v in dec.state_dict().items()})
    n = (img // 16) ** 2 + 1
    state.update({
        "mask_token": torch.zeros(1, 1, 128), "decoder_pos_embed": torch.zeros(1, n, 128),
        "decoder_embed.weight": torch.randn(128, dim) * 0.02,
        "decoder_embed.bias": torch.zeros(128),
        "decoder_norm.weight": torch.ones(128), "decoder_norm.bias": torch.zeros(128),
        "decoder_pred.weight": torch.randn(768, 128) * 0.02, "decoder_pred.bias": torch.zeros(768),
    })  # fmt: skip
    obj: dict = {"model": state, "epoch": 799, **(extra or {})}
    if record_heads:
        obj["args"] = argparse.Namespace(model="mae_vit_patch16", num_heads=heads, epochs=800)
    torch.save(obj, path)
    return path


def dinov2_model(
    name: str = "vit_large_patch14_dinov2", *, depth: int = 24, seed: int = 0, **kw: Any
) -> VisionTransformer:
    """A timm DINOv2 backbone at 224 px with random weights (layer scale far from its init)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, img_size=224, depth=depth, num_classes=0,
                              **kw).eval()  # fmt: skip
    assert isinstance(model, VisionTransformer)
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if name_.endswith(("ls1.gamma", "ls2.gamma")):
                param.uniform_(0.5, 1.5)
            elif name_ == "pos_embed":
                param.normal_(0, 0.5)
    return model


def dinov2_release(
    model: VisionTransformer,
    path: Path,
    *,
    chunks: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A DINOv2 training checkpoint (RETFound_dinov2_*) of ``model`` (timm, no registers):
    the backbone in DINOv2's naming, optionally in ``block_chunks`` of ``chunks`` blocks."""
    state = {}
    swiglu = any(".mlp.w12" in k or isinstance(m, timm.layers.GluMlp)
                 for k, m in model.named_modules())  # fmt: skip
    for k, v in model.state_dict().items():
        if chunks and k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // chunks}.{i}." + k.split(".", 2)[2]
        if swiglu:
            k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        state[f"backbone.{k}"] = v.to(dtype)
    state["backbone.mask_token"] = torch.zeros(1, model.embed_dim, dtype=dtype)
    state["dino_head.mlp.0.weight"] = torch.zeros(8, model.embed_dim, dtype=dtype)
    state["ibot_head.mlp.0.weight"] = torch.zeros(8, model.embed_dim, dtype=dtype)
    torch.save({"teacher": state}, path)
    return path


def write_stand_ins(out: Path, *, dim: int = 96, depth: int = 2, heads: int = 4) -> list[Path]:
    """The four released files (``<name>.pth``) with random weights; ViT-L is dim 1024, depth
    24, heads 16. The MAE files record their head count (MAE's ``args``); the DINOv2 files, like
    DINOv2's, do not: a non-standard size needs ``num_heads`` in the study's params."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, name in enumerate(RELEASED):
        path = out / f"{name}.pth"
        if "_mae_" in name:
            mae_release(path, dim=dim, depth=depth, heads=heads, seed=i, record_heads=True)
        else:
            model = dinov2_model(depth=depth, seed=i, embed_dim=dim, num_heads=heads)
            dinov2_release(model, path)
        written.append(path)
    return written
