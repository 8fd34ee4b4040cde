"""Importing released RETFound checkpoints, checked against an independent reference.

Each released layout is built from a timm model with random weights and saved as its release
does (:mod:`retfm.models.releases`); the imported encoder's features must equal (<= 1e-5)
those of the same file loaded the way RETFound's own code loads it (``main_finetune.py`` and
``models_vit.py`` at rmaphoh/RETFound ae9a9ec; ``util/pos_embed.interpolate_pos_embed``),
written out below as that code does it. Most files are small (ViT-L width, 2 blocks); one test
imports a full-size ViT-L (1.2 GB) and checks that it is never held twice in memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from retfm.models.checkpoints import (
    CheckpointLayoutError,
    NonFiniteWeightsError,
    UnsafeCheckpointError,
    import_checkpoint,
    import_encoder,
    load_mae_pretraining_weights,
)
from retfm.models.encoder import encode, load_encoder, save_encoder
from retfm.models.mae import MaskedAutoencoder
from retfm.models.onnx_export import export_onnx, onnx_parity
from retfm.models.releases import dinov2_model, dinov2_release, mae_release
from retfm.settings import ModelPreset

DEPTH = 2
TOL = 1e-5


# ------------------------------------------------------------- RETFound's loading, as it is
def retfound_interpolate_pos_embed(model: nn.Module, checkpoint_model: dict) -> None:
    """``util/pos_embed.interpolate_pos_embed`` of RETFound (identical to MAE's)."""
    if "pos_embed" in checkpoint_model:
        pos_embed_checkpoint = checkpoint_model["pos_embed"]
        embedding_size = pos_embed_checkpoint.shape[-1]
        num_patches = model.patch_embed.num_patches
        num_extra_tokens = model.pos_embed.shape[-2] - num_patches
        orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
        new_size = int(num_patches**0.5)
        if orig_size != new_size:
            extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
            pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
            pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(
                0, 3, 1, 2
            )
            pos_tokens = torch.nn.functional.interpolate(
                pos_tokens, size=(new_size, new_size), mode="bicubic", align_corners=False
            )
            pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
            checkpoint_model["pos_embed"] = torch.cat((extra_tokens, pos_tokens), dim=1)


class RetfoundMAE(VisionTransformer):
    """``models_vit.VisionTransformer(global_pool=True)``: ``fc_norm`` added, ``norm`` deleted,
    features = fc_norm(mean of the patch tokens). (RETFound's class no longer runs on timm 1.x,
    and under timm 0.9.2 its forward applies fc_norm a second time; with the fresh fc_norm
    every import has, that changes features by < 1e-6.)"""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        del self.norm

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1) + self.pos_embed
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:, :].mean(dim=1))


def retfound_load(model: nn.Module, checkpoint: dict, key: str) -> tuple[list, list]:
    """``main_finetune.py``'s loading of ``--finetune`` (RETFound_mae: 'model', RETFound_dinov2:
    'teacher'); returns (missing, unexpected) of its ``strict=False`` load."""
    checkpoint_model = dict(checkpoint[key])
    checkpoint_model = {k.replace("backbone.", ""): v for k, v in checkpoint_model.items()}
    checkpoint_model = {k.replace("mlp.w12.", "mlp.fc1."): v for k, v in checkpoint_model.items()}
    checkpoint_model = {k.replace("mlp.w3.", "mlp.fc2."): v for k, v in checkpoint_model.items()}
    state_dict = model.state_dict()
    for k in ["head.weight", "head.bias"]:
        if k in checkpoint_model and checkpoint_model[k].shape != state_dict[k].shape:
            del checkpoint_model[k]
    retfound_interpolate_pos_embed(model, checkpoint_model)
    checkpoint_model = {k: v.float() for k, v in checkpoint_model.items()}
    msg = model.load_state_dict(checkpoint_model, strict=False)
    return sorted(msg.missing_keys), sorted(msg.unexpected_keys)


def retfound_mae(path: Path, img_size: int, dim: int = 1024, depth: int = DEPTH) -> RetfoundMAE:
    model = RetfoundMAE(img_size=img_size, patch_size=16, embed_dim=dim, depth=depth,
                        num_heads=16, mlp_ratio=4, qkv_bias=True, num_classes=5).eval()  # fmt: skip
    missing, _ = retfound_load(model, torch.load(path, weights_only=True), "model")
    assert missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    return model


# ----------------------------------------------------------------------- released layouts
def mae_checkpoint(path: Path, *, dim: int = 1024, depth: int = DEPTH, img: int = 224,
                   extra: dict | None = None) -> Path:  # fmt: skip
    return mae_release(path, dim=dim, depth=depth, img=img, extra=extra)


def dinov2_source(name: str = "vit_large_patch14_dinov2", **kw: object) -> VisionTransformer:
    return dinov2_model(name, depth=DEPTH, **kw)


dinov2_teacher = dinov2_release


def retfound_dinov2(path: Path, img_size: int, name: str = "vit_large_patch14_dinov2",
                    **kw: object) -> VisionTransformer:  # fmt: skip
    """``RETFound_dinov2``: timm's model at the study's size, the teacher loaded as
    main_finetune.py does (``pretrained=True`` would download timm's weights first; every key
    is overwritten here, which the missing-keys check proves)."""
    model = timm.create_model(name, pretrained=False, img_size=img_size, depth=DEPTH,
                              num_classes=5, **kw).eval()  # fmt: skip
    checkpoint = torch.load(path, weights_only=True)
    missing, _ = retfound_load(model, checkpoint, "teacher")
    assert missing == ["head.bias", "head.weight"], missing
    return model


def _x(size: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, size, size)


def _dinov2_features(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


# ------------------------------------------------------------------------------- MAE
@pytest.mark.parametrize("img_size", [224, 112, 256])
def test_mae_features_equal_retfound_loading(tmp_path: Path, img_size: int) -> None:
    path = mae_checkpoint(tmp_path / "RETFound_mae_meh.pth")
    imported = import_encoder(path, "mae", img_size=img_size, num_heads=16)  # 2 deep: not standard
    reference = retfound_mae(path, img_size)
    with torch.no_grad():
        got, want = encode(imported.encoder, _x(img_size)), reference.features(_x(img_size))
    assert (got - want).abs().max() <= TOL
    spec = imported.spec
    assert (spec.embed_dim, spec.depth, spec.num_heads, spec.patch_size) == (1024, DEPTH, 16, 16)
    assert spec.img_size == img_size and imported.source_img_size == 224
    assert imported.heads_from == "num_heads from params"


def test_mae_fc_norm_starts_fresh_as_in_retfound(tmp_path: Path) -> None:
    path = mae_checkpoint(tmp_path / "m.pth")
    enc = import_encoder(path, "mae", num_heads=16).encoder
    assert torch.equal(enc.fc_norm.weight, torch.ones(1024))
    assert torch.equal(enc.fc_norm.bias, torch.zeros(1024))
    assert not any(k.startswith(("decoder", "mask_token", "norm.")) for k in enc.state_dict())


def test_heads_come_from_the_checkpoint_never_from_the_width(tmp_path: Path) -> None:
    plain = mae_checkpoint(tmp_path / "plain.pth", dim=96)
    with pytest.raises(CheckpointLayoutError, match=r"96 wide.*num_heads"):
        import_encoder(plain, "mae")
    assert import_encoder(plain, "mae", num_heads=4).spec.num_heads == 4
    recorded = mae_checkpoint(
        tmp_path / "args.pth", dim=96, extra={"args": argparse.Namespace(num_heads=8, model="x")}
    )
    imported = import_encoder(recorded, "mae")  # an argparse Namespace loads with weights_only
    assert imported.spec.num_heads == 8 and "args.num_heads" in imported.heads_from
    named = mae_checkpoint(
        tmp_path / "named.pth", extra={"args": argparse.Namespace(model="mae_vit_large_patch16")}
    )
    imported = import_encoder(named, "mae")
    assert imported.spec.num_heads == 16 and "mae_vit_large_patch16" in imported.heads_from
    wrong = mae_checkpoint(
        tmp_path / "wrong.pth",
        dim=96,
        extra={"args": argparse.Namespace(model="mae_vit_large_patch16")},
    )
    with pytest.raises(CheckpointLayoutError, match=r"names .*large.*1024 wide.*are 96 wide"):
        import_encoder(wrong, "mae")


def test_full_size_vit_large_imports_without_a_second_copy(tmp_path: Path) -> None:
    """A released-size ViT-L/16 MAE (24 blocks, 1.2 GB of encoder weights): the import reads
    the architecture (ViT-L, 16 heads) and its peak memory stays well under two copies."""
    meta = VisionTransformer(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                             global_pool="token", num_classes=0, device="meta")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in meta.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 1, 512)
    path = tmp_path / "RETFound_mae_meh.pth"
    torch.save({"model": state}, path)
    encoder_bytes = sum(v.numel() * 4 for v in state.values())
    del state
    script = f"""
import json
from pathlib import Path
from retfm.models.checkpoints import import_encoder
from retfm.models.encoder import save_encoder
def mem():  # this process's own counters (ru_maxrss would inherit the parent's peak)
    rows = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {{k: int(rows[k].split()[0]) * 1024 for k in ("VmHWM", "RssAnon")}}
before = mem()
imported = import_encoder(Path({str(path)!r}), "mae")
out = Path({str(tmp_path / "enc.safetensors")!r})
save_encoder(out, imported.encoder, imported.spec, imported.prep)
after = mem()
print(json.dumps({{"before": before, "after": after, "heads": imported.spec.num_heads,
                   "depth": imported.spec.depth, "source": imported.heads_from}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert (got["heads"], got["depth"]) == (16, 24) and "standard ViT-L" in got["source"]
    peak = got["after"]["VmHWM"] - got["before"]["VmHWM"]
    anon = got["after"]["RssAnon"] - got["before"]["RssAnon"]
    print(
        f"ViT-L import: encoder {encoder_bytes / 2**30:.2f} GiB; peak resident grew "
        f"{peak / 2**30:.2f} GiB (the file's mapped pages), private {anon / 2**30:.2f} GiB"
    )
    # the weights are resident once (the memory-mapped file) and never copied: two copies
    # would be >= 2x the encoder, a copy in private memory >= 1x
    assert peak < 1.3 * encoder_bytes and anon < 0.25 * encoder_bytes
    encoder, spec, _, _ = load_encoder(tmp_path / "enc.safetensors")
    reference = RetfoundMAE(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                            num_classes=5).eval()  # fmt: skip
    retfound_load(reference, torch.load(path, weights_only=True, mmap=True), "model")
    x = _x(224)[:1]
    with torch.no_grad():
        assert (encode(encoder, x) - reference.features(x)).abs().max() <= TOL


def test_mae_weights_continue_pretraining_at_another_grid(tmp_path: Path) -> None:
    """init_from a 224 px checkpoint into an 80 px model: position tables are interpolated."""
    path = mae_checkpoint(tmp_path / "m.pth", dim=96)
    arch = ModelPreset(img_size=80, patch_size=16, embed_dim=96, depth=DEPTH, num_heads=4,
                       decoder_embed_dim=128, decoder_depth=1, decoder_num_heads=4)  # fmt: skip
    mae = MaskedAutoencoder(arch)
    load_mae_pretraining_weights(mae, path)
    source = torch.load(path, weights_only=True)["model"]
    assert torch.equal(mae.encoder.blocks[1].mlp.fc2.weight, source["blocks.1.mlp.fc2.weight"])
    assert torch.equal(mae.norm.weight, source["norm.weight"])  # MAE's token norm
    assert mae.encoder.pos_embed.shape == (1, 26, 96)
    assert torch.equal(mae.encoder.fc_norm.weight, torch.ones(96))


# ---------------------------------------------------------------------------- DINOv2
@pytest.mark.parametrize(("img_size", "chunks"), [(224, 0), (112, 1)])
def test_dinov2_teacher_features_equal_retfound_loading(
    tmp_path: Path, img_size: int, chunks: int
) -> None:
    source = dinov2_source()
    path = dinov2_teacher(source, tmp_path / "RETFound_dinov2_meh.pth", chunks=chunks)
    imported = import_encoder(path, "dinov2", img_size=img_size, num_heads=16)
    reference = retfound_dinov2(path, img_size) if not chunks else None
    x = _x(img_size)
    with torch.no_grad():
        got = encode(imported.encoder, x)
        if reference is not None:
            assert (got - _dinov2_features(reference, x)).abs().max() <= TOL
        else:  # RETFound's renaming does not undo block chunks: compare with the unchunked file
            flat = dinov2_teacher(source, tmp_path / "flat.pth")
            want = _dinov2_features(retfound_dinov2(flat, img_size), x)
            assert (got - want).abs().max() <= TOL
    spec = imported.spec
    assert (spec.patch_size, spec.global_pool, spec.init_values is not None) == (14, "token", True)
    assert imported.layout == "DINOv2 teacher"


def test_dinov2_bfloat16_release_imports_as_float32(tmp_path: Path) -> None:
    source = dinov2_source()
    path = dinov2_teacher(source, tmp_path / "bf16.pth", dtype=torch.bfloat16)
    imported = import_encoder(path, "dinov2", num_heads=16)
    assert imported.encoder.blocks[0].attn.qkv.weight.dtype == torch.float32
    with torch.no_grad():
        got = encode(imported.encoder, _x(224))
        want = _dinov2_features(retfound_dinov2(path, 224), _x(224))
    assert (got - want).abs().max() <= TOL


def test_dinov2_with_registers_equals_timm(tmp_path: Path) -> None:
    """Register tokens (``vit_*_reg4_dinov2``): RETFound's renaming ignores them, so the
    reference is timm's own loader for that layout."""
    source = dinov2_source("vit_large_patch14_reg4_dinov2")
    raw = dict(source.state_dict())
    # back to DINOv2's own naming: registers apart, class-token position row in pos_embed
    cls_pos = torch.zeros(1, 1, source.embed_dim)
    state = {k: v for k, v in raw.items() if k not in ("reg_token", "pos_embed", "cls_token")}
    state["register_tokens"] = raw["reg_token"]
    state["cls_token"] = raw["cls_token"] - cls_pos
    state["pos_embed"] = torch.cat([cls_pos, raw["pos_embed"]], dim=1)
    path = tmp_path / "reg.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in {**state, "mask_token":
                torch.zeros(1, source.embed_dim)}.items()}}, path)  # fmt: skip
    imported = import_encoder(path, "dinov2", num_heads=16)
    assert imported.spec.reg_tokens == 4 and imported.spec.no_embed_class
    ref = timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False, img_size=224,
                            depth=DEPTH, num_classes=0).eval()  # fmt: skip
    ref.load_state_dict(checkpoint_filter_fn(dict(state, mask_token=torch.zeros(1, 1024)), ref))
    with torch.no_grad():
        assert (encode(imported.encoder, _x(224)) - ref(_x(224))).abs().max() <= TOL


def test_dinov2_swiglu_w12_w3_are_renamed(tmp_path: Path) -> None:
    """DINOv2 ViT-g's packed SwiGLU feed-forward is saved as ``mlp.w12`` / ``mlp.w3``."""
    source = dinov2_source("vit_giant_patch14_dinov2", embed_dim=96, num_heads=4)
    path = dinov2_teacher(source, tmp_path / "g.pth")
    assert any(".mlp.w12." in k for k in torch.load(path, weights_only=True)["teacher"])
    imported = import_encoder(path, "dinov2", num_heads=4)
    assert imported.spec.swiglu
    reference = retfound_dinov2(path, 224, "vit_giant_patch14_dinov2", embed_dim=96, num_heads=4)
    with torch.no_grad():
        got = encode(imported.encoder, _x(224))
        assert (got - _dinov2_features(reference, _x(224))).abs().max() <= TOL


def test_dinov2_encoder_saves_loads_and_exports(tmp_path: Path) -> None:
    path = dinov2_teacher(dinov2_source("vit_small_patch14_dinov2"), tmp_path / "s.pth")
    imported = import_encoder(path, "dinov2", img_size=56, num_heads=6)
    saved = save_encoder(tmp_path / "e.safetensors", imported.encoder, imported.spec,
                         imported.prep)  # fmt: skip
    encoder, spec, prep, _ = load_encoder(saved)
    assert spec == imported.spec and prep.img_size == 56
    with torch.no_grad():
        assert torch.equal(encode(encoder, _x(56)), encode(imported.encoder, _x(56)))
    onnx_path = export_onnx(encoder, prep, tmp_path / "e.onnx")
    assert onnx_parity(encoder, onnx_path) < 1e-4


# ------------------------------------------------------------------------------ refusals
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    path = mae_checkpoint(tmp_path / "m.pth")
    obj = torch.load(path, weights_only=True)
    obj["model"]["blocks.1.attn.proj.weight"][0, :3] = float("nan")
    obj["model"]["decoder_pred.weight"][0, 0] = float("inf")  # not kept: does not matter
    torch.save(obj, path)
    bad = r"m\.pth.*blocks\.1\.attn\.proj\.weight \(3 of"
    with pytest.raises(NonFiniteWeightsError, match=bad):
        import_encoder(path, "mae", num_heads=16)


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": Exploit()}}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        import_checkpoint(path, "mae")
    with pytest.raises(UnsafeCheckpointError):
        import_checkpoint(path, "dinov2")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load does run it
    assert marker.exists()


def test_wrong_layout_errors_name_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"optimizer": {"lr": 1.0}, "epoch": 3}, path)
    with pytest.raises(CheckpointLayoutError, match=r"\{'model': state_dict\}.*epoch, optimizer"):
        import_checkpoint(path, "mae")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointLayoutError, match="missing .*patch_embed.proj.weight.*fc.weight"):
        import_checkpoint(path, "mae")
    torch.save({"teacher": {"dino_head.mlp.0.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointLayoutError, match="no 'backbone.' keys"):
        import_checkpoint(path, "dinov2")
    mae = mae_checkpoint(tmp_path / "mae.pth")
    with pytest.raises(CheckpointLayoutError, match=r"not a DINOv2.*blocks\.0\.ls1\.gamma"):
        import_checkpoint(mae, "dinov2")
    with pytest.raises(CheckpointLayoutError, match=r"100px.*not a multiple.*patch 16px"):
        import_encoder(mae, "mae", img_size=100, num_heads=16)


def test_missing_block_weights_are_listed(tmp_path: Path) -> None:
    path = mae_checkpoint(tmp_path / "broken.pth")
    obj = torch.load(path, weights_only=True)
    del obj["model"]["blocks.1.mlp.fc1.weight"]
    torch.save(obj, path)
    with pytest.raises(CheckpointLayoutError, match=r"broken.pth.*missing blocks.1.mlp.fc1.weight"):
        import_encoder(path, "mae", num_heads=16)
