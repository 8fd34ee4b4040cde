"""Pre-training with the MAE recipe: schedule, learning, stopping, checkpoints and exact resume."""

from __future__ import annotations

import csv
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retfm.data.images import ArrayImages
from retfm.models.encoder import EncoderSpec, Preprocessing, load_encoder
from retfm.models.mae import MaskedAutoencoder
from retfm.settings import MAERecipeSettings, ModelPreset, PretrainSettings
from retfm.training import (
    CheckpointMismatchError,
    NonFiniteLossError,
    pretrain_fm,
    read_checkpoint_extra,
)
from retfm.training.augment import random_resized_crop_flip
from retfm.training.recipes.mae import build_optimizer
from retfm.training.schedule import effective_lr, lr_at, set_lr

ARCH = ModelPreset(
    img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
)  # fmt: skip
PREP = Preprocessing(img_size=32)


def smooth_images(n: int = 96, seed: int = 0) -> ArrayImages:
    """Images upsampled from 3x3 random colours: masked patches are predictable from their
    neighbours, so an MAE can learn them in a few epochs."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 3, 3, generator=gen)
    up = F.interpolate(low, size=32, mode="bilinear", align_corners=True)
    return ArrayImages((up * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().copy())


def settings(**over: object) -> PretrainSettings:
    """Loop settings and MAE recipe settings by name (the MAE ones go to ``pretrain.mae``)."""
    base = dict(epochs=2, batch_size=16, warmup_epochs=1, base_lr=5e-2, num_threads=1,
                checkpoint_every_steps=1000)  # fmt: skip
    merged = {**base, **over}
    mae = {k: merged.pop(k) for k in list(merged) if k in MAERecipeSettings.model_fields}
    return PretrainSettings(**merged, mae=MAERecipeSettings(**mae))


# ------------------------------------------------------------------------- schedule
def test_lr_warms_up_linearly_then_follows_cosine_to_min() -> None:
    kw = dict(peak_lr=1.0, min_lr=0.1, warmup_epochs=2, total_epochs=10)
    assert lr_at(0.0, **kw) == 0.0
    assert lr_at(1.0, **kw) == pytest.approx(0.5)
    assert lr_at(2.0, **kw) == pytest.approx(1.0)
    assert lr_at(6.0, **kw) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(10.0, **kw) == pytest.approx(0.1)
    after = [lr_at(2 + 0.5 * i, **kw) for i in range(17)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))


def test_effective_lr_scales_with_total_batch() -> None:
    assert effective_lr(1.5e-4, 64, 2, 4) == pytest.approx(1.5e-4 * 512 / 256)


def test_set_lr_honours_lr_scale() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.5}], lr=1.0)
    set_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.1])


def test_no_weight_decay_on_biases_norms_and_tokens() -> None:
    mae = MaskedAutoencoder(ARCH)
    opt = build_optimizer(mae, settings(weight_decay=0.05).mae, lr=1e-3)
    names = {id(p): n for n, p in mae.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "encoder.blocks.0.attn.qkv.weight" in decayed
    assert {"encoder.cls_token", "mask_token", "norm.weight",
            "encoder.blocks.0.attn.qkv.bias"} <= exempt  # fmt: skip
    assert "encoder.pos_embed" not in decayed | exempt  # frozen, not optimised at all
    assert "encoder.fc_norm.weight" not in decayed | exempt  # fresh for adaptation


# ---------------------------------------------------------------------- augmentation
def test_crop_of_whole_image_is_identity_or_mirror() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    y = random_resized_crop_flip(x, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert y.shape == x.shape
    for a, b in zip(x, y, strict=True):
        assert torch.allclose(a, b, atol=1e-5) or torch.allclose(a.flip(-1), b, atol=1e-5)


def test_crops_differ_per_sample() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16).expand(4, -1, -1, -1)
    y = random_resized_crop_flip(x)
    assert not torch.allclose(y[0], y[1])


# -------------------------------------------------------------------------- training
def test_loss_decreases_and_outputs_are_written(tmp_path: Path) -> None:
    logged: list[tuple[int, dict[str, float]]] = []
    cfg = settings(epochs=6)
    result = pretrain_fm("mae",
        cfg, ARCH, smooth_images(), tmp_path, seed=0, prep=PREP,
        log_fn=lambda m, s: logged.append((s, m)), progress=False, log_every=4,
    )  # fmt: skip
    per_epoch = 96 // 16
    assert result.steps == 6 * per_epoch and len(result.history) == result.steps
    first = np.mean([loss for _, loss, _ in result.history[:per_epoch]])
    assert result.final_loss < 0.8 * first
    encoder, arch, prep, meta = load_encoder(result.encoder_path)
    assert (
        arch == EncoderSpec.from_preset(ARCH) and prep == PREP and meta["recipe"] == cfg.mae.recipe
    )
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, result.steps + 1))
    assert set(rows[0]) == {"step", "epoch", "loss", "lr"}
    assert logged and {"loss", "lr", "epoch", "images_per_s"} <= set(logged[0][1])
    assert [s for s, _ in logged] == sorted(s for s, _ in logged)


def test_lr_is_set_every_iteration(tmp_path: Path) -> None:
    cfg = settings(epochs=3, warmup_epochs=1, min_lr=1e-5)
    result = pretrain_fm(
        "mae", cfg, ARCH, smooth_images(), tmp_path, seed=0, prep=PREP, progress=False
    )
    peak = effective_lr(cfg.mae.base_lr, cfg.batch_size, 1, 1)
    iters = 96 // 16
    expected = [
        lr_at(e + i / iters, peak_lr=peak, min_lr=cfg.mae.min_lr, warmup_epochs=1, total_epochs=3)
        for e in range(3)
        for i in range(iters)
    ]
    assert [lr for _, _, lr in result.history] == pytest.approx(expected)
    assert len(set(expected)) == len(expected)  # a new rate at every step


def test_gradient_accumulation_steps_once_per_group(tmp_path: Path) -> None:
    cfg = settings(epochs=1, batch_size=8, accum_steps=3)
    result = pretrain_fm(
        "mae", cfg, ARCH, smooth_images(), tmp_path, seed=0, prep=PREP, progress=False
    )
    assert result.steps == (96 // 8) // 3


def test_non_finite_loss_stops_with_step_epoch_and_lr(tmp_path: Path) -> None:
    cfg = settings(base_lr=1e30, warmup_epochs=0)
    with pytest.raises(NonFiniteLossError) as info:
        pretrain_fm("mae", cfg, ARCH, smooth_images(), tmp_path, seed=0, prep=PREP, progress=False)
    err = info.value
    assert err.step >= 2 and err.epoch == 0 and err.lr > 1e28  # peak 1e30 * 16 / 256
    assert f"step {err.step}" in str(err) and "epoch 0" in str(err) and "lr" in str(err)
    assert not (tmp_path / "encoder.safetensors").exists()


def test_checkpoint_holds_state_extra_and_loads_without_pickled_code(tmp_path: Path) -> None:
    assert read_checkpoint_extra(tmp_path) is None
    cfg = settings(epochs=1, checkpoint_every_steps=2)
    pretrain_fm("mae", cfg, ARCH, smooth_images(), tmp_path, seed=0, prep=PREP, progress=False,
              extra={"mlflow_run_id": "abc123"})  # fmt: skip
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "epoch", "step_in_epoch", "global_step", "rng", "fingerprint",
            "extra"} <= set(state)  # fmt: skip
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 6)
    assert {"torch", "numpy", "python"} <= set(state["rng"][0])
    assert read_checkpoint_extra(tmp_path) == {"mlflow_run_id": "abc123"}


def test_checkpoint_from_other_settings_is_refused(tmp_path: Path) -> None:
    images = smooth_images()
    pretrain_fm(
        "mae", settings(epochs=1), ARCH, images, tmp_path, seed=0, prep=PREP, progress=False
    )
    with pytest.raises(CheckpointMismatchError, match="Delete the checkpoint"):
        pretrain_fm(
            "mae", settings(epochs=1), ARCH, images, tmp_path, seed=1, prep=PREP, progress=False
        )
    with pytest.raises(CheckpointMismatchError, match="restore the params"):
        pretrain_fm(
            "mae",
            settings(epochs=1, base_lr=1e-3),
            ARCH,
            images,
            tmp_path,
            seed=0,
            prep=PREP,
            progress=False,
        )


def test_rerun_of_finished_run_only_rewrites_outputs(tmp_path: Path) -> None:
    images = smooth_images()
    first = pretrain_fm("mae", settings(epochs=1), ARCH, images, tmp_path, seed=0, prep=PREP,
                      progress=False)  # fmt: skip
    again = pretrain_fm("mae", settings(epochs=1, num_threads=2), ARCH, images, tmp_path, seed=0,
                      prep=PREP, progress=False)  # fmt: skip
    assert again.steps == first.steps and again.history == first.history
    assert again.param_digest == first.param_digest


def test_wrong_image_size_and_too_few_images_are_explained(tmp_path: Path) -> None:
    small = ArrayImages(np.zeros((40, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"expected uint8 \(1, 32, 32, 3\)"):
        pretrain_fm("mae", settings(), ARCH, small, tmp_path, seed=0, prep=PREP, progress=False)
    few = ArrayImages(np.zeros((10, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="too few"):
        pretrain_fm("mae", settings(), ARCH, few, tmp_path, seed=0, prep=PREP, progress=False)


# ---------------------------------------------------------------------------- resume
_KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from test_pretrain import ARCH, PREP, settings, smooth_images
    from retfm.training import pretrain_fm

    out = Path(sys.argv[1])

    def log(metrics, step):
        # die the hard way one step after the first mid-epoch checkpoint, so that step's
        # work is lost and the resumed run has to redo it
        ckpt = out / "checkpoint.pt"
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["global_step"] == step - 1:
            os.kill(os.getpid(), signal.SIGKILL)

    pretrain_fm("mae", settings(epochs=3, checkpoint_every_steps=4), ARCH, smooth_images(), out,
              seed=0, prep=PREP, log_fn=log, progress=False, log_every=1)
    """
)


@pytest.mark.e2e
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    cfg = settings(epochs=3, checkpoint_every_steps=4)
    reference = pretrain_fm("mae", cfg, ARCH, smooth_images(), tmp_path / "ref", seed=0, prep=PREP,
                          progress=False)  # fmt: skip

    out = tmp_path / "killed"
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN.format(tests=str(Path(__file__).parent)))
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (4, 0, 4)
    assert not (out / "encoder.safetensors").exists()

    resumed = pretrain_fm("mae", cfg, ARCH, smooth_images(), out, seed=0, prep=PREP, progress=False)
    assert resumed.steps == reference.steps == 3 * 6
    assert math.isclose(resumed.final_loss, reference.final_loss, rel_tol=1e-5)
    assert [s for s, _, _ in resumed.history] == list(range(1, 19))
    np.testing.assert_allclose(
        [loss for _, loss, _ in resumed.history], [loss for _, loss, _ in reference.history],
        rtol=1e-5,
    )  # fmt: skip
