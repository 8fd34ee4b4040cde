"""The DINOv2 recipe: its losses on hand-computed cases, its optimiser groups, learning (loss falls,
k-NN beats a random encoder), the collapse stop, and exact resume after ``kill -9``."""

from __future__ import annotations

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
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss

from retfm.data.images import ArrayImages
from retfm.models.encoder import Preprocessing, encode, load_encoder
from retfm.settings import DINOv2RecipeSettings, ModelPreset, PretrainSettings
from retfm.training import pretrain_fm
from retfm.training.dino_losses import cross_view_ce, masked_patch_ce, sinkhorn_knopp
from retfm.training.recipes import recipe_class
from retfm.training.recipes.dinov2 import CollapseError, DINOv2Recipe, param_groups

ARCH = ModelPreset(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                   decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)  # fmt: skip
PREP = Preprocessing(img_size=32)
LN2 = math.log(2)


def settings(**over: object) -> PretrainSettings:
    """A small, fast DINOv2 (loop settings by name, the rest to ``pretrain.dinov2``)."""
    loop = {k: over.pop(k) for k in list(over) if k in PretrainSettings.model_fields}
    recipe = dict(warmup_epochs=1, warmup_teacher_temp_epochs=1, out_dim=256, head_hidden_dim=64,
                  head_bottleneck_dim=32, local_crops=2, local_crop_size=16, base_lr=0.02,
                  layerscale=1.0, drop_path=0.0, momentum_teacher=0.9)  # fmt: skip
    base = dict(epochs=2, batch_size=32, num_threads=1, checkpoint_every_steps=1000)
    return PretrainSettings(**{**base, **loop}, dinov2=DINOv2RecipeSettings(**{**recipe, **over}))


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: one large disc; class 1: a dozen small dots; random colours for both (a nuisance
    DINO's colour augmentations teach the encoder to ignore)."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 2, n)
    yy, xx = np.mgrid[0:32, 0:32]
    out = np.zeros((n, 32, 32, 3), np.float32)
    for i in range(n):
        m = np.zeros((32, 32), np.float32)
        if y[i] == 0:
            cy, cx = g.uniform(10, 22, 2)
            m[(yy - cy) ** 2 + (xx - cx) ** 2 < g.uniform(6, 9) ** 2] = 1
        else:
            for _ in range(12):
                cy, cx = g.uniform(2, 30, 2)
                m[(yy - cy) ** 2 + (xx - cx) ** 2 < 2.5] = 1
        c1, c2 = g.uniform(0, 1, 3), g.uniform(0, 1, 3)
        out[i] = m[..., None] * c1 + (1 - m[..., None]) * c2
    return (out * 255).round().astype(np.uint8), y


# ----------------------------------------------------------------------------- losses
def test_dino_loss_on_a_hand_computed_case() -> None:
    # teacher views: one-hot on prototype 0 and 1; student softmax (at temp 1): view 0
    # [3/4, 1/4], view 1 [1/4, 3/4], a local view [1/2, 1/2]. Cross-view pairs: (t0, s1) ln 4,
    # (t0, s2) ln 2, (t1, s0) ln 4, (t1, s2) ln 2 -> 6 ln 2 over 4 terms.
    targets = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    student = torch.tensor([[[math.log(3), 0.0]], [[0.0, math.log(3)]], [[0.0, 0.0]]])
    assert cross_view_ce(targets, student, 1.0).item() == pytest.approx(1.5 * LN2)


def test_dino_loss_matches_lightly_with_softmax_targets() -> None:
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 7), torch.randn(4, 5, 7)
    ours = cross_view_ce(F.softmax(teacher / 0.04, dim=-1), student, 0.1)
    theirs = DINOLoss(7, student_temp=0.1)(list(teacher), list(student), teacher_temp=0.04)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_ibot_loss_averages_masked_patches_per_image() -> None:
    # image 0 has both patches masked, image 1 one: weights 1/2, 1/2, 1; student uniform over
    # 2 prototypes except the last patch, which puts 3/4 on the teacher's prototype.
    mask = torch.tensor([[[True, True]], [[False, True]]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0], [math.log(3), 0.0]])
    expected = (0.5 * LN2 + 0.5 * LN2 + 1.0 * -math.log(0.75)) / 2
    assert masked_patch_ce(targets, student, mask, 1.0).item() == pytest.approx(expected)
    theirs = IBOTPatchLoss(2, student_temp=1.0)
    logits = torch.log(targets.clamp(min=1e-30)) * 0.04  # softmax at temp 0.04: the targets
    assert theirs(logits, student, mask, teacher_temp=0.04).item() == pytest.approx(expected)


def test_koleo_on_three_points_at_right_angles() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # nearest neighbours sqrt(2) away
    assert KoLeoLoss()(x).item() == pytest.approx(-0.5 * LN2, abs=1e-6)


def test_sinkhorn_knopp_balances_prototypes_over_the_batch() -> None:
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [4.0, 0.0], [4.0, 1.0]])  # all prefer 0
    q = sinkhorn_knopp(logits, temp=1.0, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((2,), 2.0), atol=1e-3)
    assert q[0, 0] > q[3, 0]  # the ordering of preferences survives
    assert torch.allclose(sinkhorn_knopp(logits + 100, 1.0), sinkhorn_knopp(logits, 1.0))


# ----------------------------------------------------------------------------- optimiser
def test_param_groups_carry_layer_decay_patch_multiplier_and_no_decay() -> None:
    cfg = settings(layer_decay=0.5, patch_embed_lr_mult=0.2)
    model = DINOv2Recipe(cfg, ARCH, PREP, images_per_step=32).build()
    groups = param_groups(model, cfg.dinov2)
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert where[id(named["student.vit.blocks.1.mlp.fc1.weight"])]["lr_scale"] == 0.5
    assert where[id(named["student.vit.blocks.0.mlp.fc1.weight"])]["lr_scale"] == 0.25
    assert where[id(named["student.vit.patch_embed.proj.weight"])]["lr_scale"] == pytest.approx(
        0.125 * 0.2
    )
    for name in ("student.vit.blocks.0.ls1.gamma", "student.vit.cls_token", "student.mask_token",
                 "student.vit.blocks.0.norm1.bias"):  # fmt: skip
        assert where[id(named[name])]["wd_scale"] == 0.0, name
    assert where[id(named["student_head.last_layer.weight_v"])]["last_layer"]
    assert not any(p.requires_grad for n, p in named.items() if n.startswith("teacher"))
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_a_third_recipe_name_is_refused_with_the_known_ones() -> None:
    assert recipe_class("dinov2") is DINOv2Recipe
    with pytest.raises(ValueError, match=r"no pre-training recipe 'ijepa'.*'mae', 'dinov2'"):
        recipe_class("ijepa")


# ----------------------------------------------------------------------------- learning
def _knn_accuracy(encoder: torch.nn.Module, x: np.ndarray, y: np.ndarray, k: int = 5) -> float:
    with torch.no_grad():
        f = F.normalize(encode(encoder.eval(), PREP.normalise(torch.from_numpy(x))), dim=-1)
    sim = f @ f.T
    sim.fill_diagonal_(-2)
    votes = torch.from_numpy(y)[sim.topk(k, dim=1).indices].float().mean(1)
    return float(((votes > 0.5).long().numpy() == y).mean())


def test_short_pretraining_lowers_the_loss_and_beats_a_random_encoder(tmp_path: Path) -> None:
    train_x, _ = blobs(256, seed=0)
    test_x, test_y = blobs(400, seed=1)
    cfg = settings(epochs=30)
    logged: list[dict[str, float]] = []
    result = pretrain_fm("dinov2", cfg, ARCH, ArrayImages(train_x), tmp_path, seed=0, prep=PREP,
                         progress=False, log_fn=lambda m, s: logged.append(m))  # fmt: skip
    per_epoch = 256 // 32
    first = np.mean([loss for _, loss, _ in result.history[:per_epoch]])
    assert result.final_loss < 0.9 * first
    encoder, spec, _, meta = load_encoder(result.encoder_path)
    assert (spec.family, spec.global_pool, spec.init_values) == ("dinov2", "token", 1.0)
    assert meta["recipe"] == cfg.dinov2.recipe
    torch.manual_seed(0)
    random = DINOv2Recipe(cfg, ARCH, PREP, images_per_step=32).build().encoder
    trained, chance = _knn_accuracy(encoder, test_x, test_y), _knn_accuracy(random, test_x, test_y)
    assert trained > chance + 0.08, (trained, chance)  # measured: 0.77 vs 0.58 (400 images)
    for key in (
        "dino_loss",
        "ibot_loss",
        "koleo_loss",
        "embedding_std",
        "teacher_entropy",
        "teacher_mean_entropy",
        "momentum",
        "teacher_temp",
        "weight_decay",
        "grad_norm",
    ):
        assert all(math.isfinite(m[key]) for m in logged), key
    assert logged[-1]["momentum"] > logged[0]["momentum"]
    assert logged[-1]["weight_decay"] > logged[0]["weight_decay"]


def test_collapse_statistics_read_zero_on_identical_embeddings() -> None:
    tokens = torch.randn(1, 64).expand(16, 64)  # every image the same embedding
    probs = F.one_hot(torch.zeros(16, dtype=torch.long), 256).float()  # and the same prototype
    stats = DINOv2Recipe._stats({"teacher_cls_tokens": tokens, "teacher_probs": probs,
                                 "dino_loss": torch.tensor(0.0), "ibot_loss": torch.tensor(0.0),
                                 "koleo_loss": torch.tensor(0.0)})  # fmt: skip
    assert stats["embedding_std"] == pytest.approx(0.0, abs=1e-6)
    assert stats["teacher_mean_entropy"] == pytest.approx(0.0, abs=1e-6)


def test_a_collapsed_representation_stops_the_run_with_a_clear_message(tmp_path: Path) -> None:
    images = ArrayImages(blobs(64, 0)[0])
    # a floor no spread reaches at this size stands in for a collapse (the statistics' own
    # zero on collapsed embeddings is checked above)
    cfg = settings(epochs=2, collapse_after_epochs=0.5, min_embedding_std=0.99)
    with pytest.raises(CollapseError, match=r"collapsed at optimizer step 1 \(epoch 0\.50\)"):
        pretrain_fm("dinov2", cfg, ARCH, images, tmp_path, seed=0, prep=PREP, progress=False,
                    log_every=1)  # fmt: skip
    assert not (tmp_path / "encoder.safetensors").exists()


_KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from test_dinov2 import ARCH, PREP, blobs, settings
    from retfm.data.images import ArrayImages
    from retfm.training import pretrain_fm

    out = Path(sys.argv[1])

    def log(metrics, step):
        ckpt = out / "checkpoint.pt"
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["global_step"] == step - 1:
            os.kill(os.getpid(), signal.SIGKILL)

    pretrain_fm("dinov2", settings(epochs=3, checkpoint_every_steps=2),  ARCH,
                ArrayImages(blobs(128, 0)[0]), out, seed=0, prep=PREP, log_fn=log,
                progress=False, log_every=1)
    """
)


@pytest.mark.e2e
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    """Student, teacher, loss centres, optimiser, schedules, RNG and data order all resume."""
    cfg = settings(epochs=3, checkpoint_every_steps=2)
    images = ArrayImages(blobs(128, 0)[0])
    reference = pretrain_fm("dinov2", cfg, ARCH, images, tmp_path / "ref", seed=0, prep=PREP,
                            progress=False)  # fmt: skip
    out = tmp_path / "killed"
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN.format(tests=str(Path(__file__).parent)))
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 2 and not (out / "encoder.safetensors").exists()
    assert any(k.startswith("teacher.") for k in state["model"])

    resumed = pretrain_fm("dinov2", cfg, ARCH, images, out, seed=0, prep=PREP, progress=False)
    assert resumed.steps == reference.steps == 3 * 4
    np.testing.assert_allclose([loss for _, loss, _ in resumed.history],
                               [loss for _, loss, _ in reference.history], rtol=1e-5)  # fmt: skip
    assert resumed.param_digest == reference.param_digest
