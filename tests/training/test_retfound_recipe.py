"""retfm's adaptation recipe against the values RETFound's own code produces.

RETFound's pieces are written out below as they are in rmaphoh/RETFound at ae9a9ec
(``util/datasets.build_transform``, ``engine_finetune.evaluate``'s metrics and score,
``main_finetune.py``'s selection, ``util/lr_decay.param_groups_lrd``), and run side by side with
retfm's on the same images, predictions and seeds.
"""

from __future__ import annotations

import random
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
import pytest
import torch
from PIL import Image
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import create_optimizer_v2
from torchvision import transforms as T

from retfm.data.shards import eval_resize, pack_images
from retfm.models.encoder import Preprocessing, build_encoder
from retfm.settings import AdaptSettings, ModelPreset
from retfm.training import transforms
from retfm.training.adapt import _select, retfound_score

RETFOUND_ARGS = Namespace(  # main_finetune.py's argparse defaults
    color_jitter=None, aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1
)


def retfound_build_transform(is_train: str, input_size: int, args: Namespace = RETFOUND_ARGS):  # noqa: ANN201
    """``util/datasets.build_transform`` of RETFound."""
    mean = IMAGENET_DEFAULT_MEAN
    std = IMAGENET_DEFAULT_STD
    if is_train == "train":
        return create_transform(
            input_size=input_size,
            is_training=True,
            color_jitter=args.color_jitter,
            auto_augment=args.aa,
            interpolation="bicubic",
            re_prob=args.reprob,
            re_mode=args.remode,
            re_count=args.recount,
            mean=mean,
            std=std,
        )
    t = []
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    size = int(input_size / crop_pct)
    t.append(T.Resize(size, interpolation=T.InterpolationMode.BICUBIC))
    t.append(T.CenterCrop(input_size))
    t.append(T.ToTensor())
    t.append(T.Normalize(mean, std))
    return T.Compose(t)


def _photo(path: Path, w: int, h: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = (np.sin(xx / 7.0) + np.cos(yy / 5.0))[..., None] * 60 + 120
    pixels = np.clip(smooth + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize(("size", "w", "h"), [(224, 300, 300), (64, 90, 90), (64, 120, 90)])
def test_evaluation_view_equals_retfounds_eval_transform(
    tmp_path: Path, size: int, w: int, h: int
) -> None:
    """A task packed at eval_resize(S), its centre S x S normalised: RETFound's
    Resize(S / crop_pct, bicubic) + CenterCrop(S) + ToTensor + Normalize of the file."""
    photo = _photo(tmp_path / "a.png", w, h)
    assert eval_resize(size) == int(size / (224 / 256))
    meta = pd.DataFrame({"image_id": ["a"], "path": ["a.png"]})
    packed = pack_images(meta, tmp_path, tmp_path / "packed", image_size=eval_resize(size),
                         shard_size=4, workers=1, progress=False)  # fmt: skip
    prep = Preprocessing.retfound(size)
    ours = prep.eval_batch(packed.take([0]))[0]
    theirs = retfound_build_transform("eval", size)(Image.open(photo).convert("RGB"))
    assert ours.shape == theirs.shape == (3, size, size)
    if w == h:
        assert (ours - theirs).abs().max() < 1e-5
    else:  # a rectangular photo is centre-cropped twice (packed square, then S): at most a
        # one-pixel shift (photos are squared by pack.fundus_crop first in the study)
        shifted = min((ours[:, :, dx:] - theirs[:, :, : size - dx]).abs().max()
                      for dx in (0, 1))  # fmt: skip
        assert shifted < 1e-5


def test_training_transform_is_retfounds(tmp_path: Path) -> None:
    """Same image, same seeds: retfm's training transform gives RETFound's tensor exactly."""
    size = 64
    img = Image.open(_photo(tmp_path / "a.png", eval_resize(size), eval_resize(size)))
    ours_t = transforms.train_transform(Preprocessing.retfound(size), AdaptSettings())
    theirs_t = retfound_build_transform("train", size)
    assert repr(ours_t) == repr(theirs_t)
    for seed in range(12):  # enough draws to cover crops, flips, every RandAugment op
        outs = []
        for t in (ours_t, theirs_t):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            try:
                outs.append(t(img.copy()))
            except ValueError as err:  # Pillow >= 12 refuses posterize(bits=0)
                assert "bits" in str(err) and t is theirs_t
                outs.append(None)
        if outs[1] is not None:
            assert torch.equal(outs[0], outs[1])


def test_posterize_to_zero_bits_gives_the_old_black_image() -> None:
    """timm's increasing posterize keeps 0 bits at the magnitude limit; Pillow < 12 gave a black
    image, newer Pillow raises. retfm keeps the old result."""
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert transforms._posterize(img, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert transforms._posterize(img, 8) is img
    major = int(PIL.__version__.split(".")[0])
    if major >= 12:
        with pytest.raises(ValueError, match="bits"):
            PIL.ImageOps.posterize(img, 0)


def test_transforms_are_seeded_per_adaptation_seed() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (73, 73, 3), np.uint8))
    t = transforms.train_transform(Preprocessing.retfound(64), AdaptSettings())
    random.seed(99)
    outside = random.random()
    with transforms.seeded(3):
        torch.manual_seed(3)
        a = t(img)
    with transforms.seeded(3):
        torch.manual_seed(3)
        b = t(img)
    assert torch.equal(a, b)
    random.seed(99)
    assert random.random() == outside  # the caller's state came back


def retfound_metrics(true_labels: np.ndarray, pred_softmax: np.ndarray) -> dict[str, float]:
    """``engine_finetune.evaluate``: one-hot F1 and AUROC, unweighted kappa, their mean."""
    k = pred_softmax.shape[1]
    pred_labels = pred_softmax.argmax(1)
    true_onehot = np.eye(k)[true_labels]
    pred_onehot = np.eye(k)[pred_labels]
    kappa = cohen_kappa_score(true_labels, pred_labels)
    f1 = f1_score(true_onehot, pred_onehot, zero_division=0, average="macro")
    roc_auc = roc_auc_score(true_onehot, pred_softmax, multi_class="ovr", average="macro")
    return {"f1": f1, "auroc": roc_auc, "kappa": kappa, "score": (f1 + roc_auc + kappa) / 3}


@pytest.mark.parametrize("k", [2, 3, 5])
def test_validation_score_equals_retfounds(k: int) -> None:
    rng = np.random.default_rng(k)
    for trial in range(20):
        y = rng.integers(0, k, 150)
        y[:k] = np.arange(k)  # every class present, as RETFound's sklearn call needs
        logits = rng.normal(0, 1, (150, k)) + (trial / 10) * np.eye(k)[y]
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        ours, theirs = retfound_score(y, probs), retfound_metrics(y, probs)
        for key in ("f1", "auroc", "kappa", "score"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key


def test_selection_is_retfounds_strictly_better_rule() -> None:
    """main_finetune.py: ``if max_score < val_score: save best``: the earliest of equal scores."""
    scores = [0.40, 0.55, 0.52, 0.55, 0.31, 0.55]
    max_score, best = 0.0, None
    for epoch, val_score in enumerate(scores):
        if max_score < val_score:
            max_score, best = val_score, epoch
    history = [{"val_score": s, "val_auroc": 0.5, "val_loss": 1.0} for s in scores]
    assert _select(history, "retfound") == best == 1


def retfound_param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=(), layer_decay=0.75):  # noqa: ANN001, ANN201
    """``util/lr_decay.param_groups_lrd`` of RETFound: per-parameter lr scale."""
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]

    def layer_id(name: str) -> int:
        if name in ["cls_token", "pos_embed"] or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks"):
            return int(name.split(".")[1]) + 1
        return num_layers

    return {n: layer_scales[layer_id(n)] for n, p in model.named_parameters() if p.requires_grad}


def test_layer_decay_scales_equal_retfounds() -> None:
    arch = ModelPreset(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                       decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    vit = build_encoder(arch, num_classes=3)
    opt = create_optimizer_v2(vit, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.65)
    names = {id(p): n for n, p in vit.named_parameters()}
    ours = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    theirs = retfound_param_groups_lrd(vit, layer_decay=0.65)
    assert ours.keys() == theirs.keys()
    for name, scale in theirs.items():
        assert ours[name] == pytest.approx(scale), name
