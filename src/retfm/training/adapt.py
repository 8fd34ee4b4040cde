"""Adapt a pre-trained FM encoder to one downstream task, for one seed (RETFound recipe).

Two methods, one contract:

- ``linear_probe``: the encoder stays frozen; a BatchNorm(affine=False) + Linear head (MAE/RETFound
  linear probing) is trained on features computed once. Optimiser: AdamW (not MAE's LARS) with
  MAE's linear-probe recipe, ``probe_base_lr`` (0.1) and ``probe_weight_decay`` (0): the
  fine-tuning base_lr (5e-3) leaves a probe under-fitted (measured on the demo: test AUROC 0.70
  vs 0.81 on screening_dr).
- ``finetune``: the whole ViT plus a fresh head, AdamW with layer-wise lr decay
  (``timm.optim.create_optimizer_v2``), drop path, light flip/crop augmentation.

Both: effective lr = base_lr x batch / 256; linear warm-up for ``warmup_epochs`` then cosine to
``min_lr``, set every iteration (``timm.scheduler.CosineLRScheduler``); label smoothing; the epoch
with the best validation AUROC (macro one-vs-rest; ties go to the lower validation loss) is kept in
memory and the test split is predicted once, with it. Everything random (head init, drop path,
shuffles, augmentation) derives from ``seed``; the caller's global RNG state is left untouched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm.auto import tqdm

from retfm.data.images import ImageSource
from retfm.models.classifier import Classifier, probe_head
from retfm.models.encoder import Preprocessing, build_encoder, load_encoder
from retfm.settings import AdaptSettings
from retfm.training.features import extract_features

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("image_id", "patient_id", "label", "split")
METADATA_COLUMNS = ("age", "sex", "ethnicity")
# Light augmentation for fine-tuning on small sets: crops keep 70-100% of the image area with a
# mild aspect change, so lesions near the border mostly stay in view.
CROP_AREA = (0.7, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# RETFound initialises the fine-tuning head almost at zero so the first steps barely move the
# pre-trained encoder.
FINETUNE_HEAD_STD = 2e-5


@dataclass
class AdaptResult:
    """One (encoder, task, method, seed) adaptation.

    ``predictions``: one row per test image: image_id, patient_id, y_true (class index),
    prob_0..prob_{K-1}, then age/sex/ethnicity where the task has them. ``val_scores[e]`` is the
    validation AUROC after epoch ``e`` (epochs count from 0); ``history[e]`` adds train/val loss
    and the lr at the end of that epoch. ``classifier`` holds the selected epoch's weights.
    """

    method: str
    seed: int
    classes: list[str]
    predictions: pd.DataFrame
    val_scores: list[float]
    best_epoch: int
    best_val_auroc: float
    history: list[dict[str, float]]
    classifier: Classifier = field(repr=False)


@dataclass(frozen=True)
class _Task:
    classes: list[str]
    y: np.ndarray  # (N,) int64 class index
    idx: dict[str, np.ndarray]  # split -> row positions


# ---------------------------------------------------------------------------------------------
# Task checks


def task_classes(labels: pd.Series) -> list[str]:
    """Sorted unique labels as strings; numerically when every label reads as a number."""
    names = sorted({str(v) for v in labels})
    try:
        return sorted(names, key=float)
    except ValueError:
        return names


def _check_task(meta: pd.DataFrame, n_images: int) -> _Task:
    missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise ValueError(
            f"task metadata lacks column(s) {missing}; expected {list(REQUIRED_COLUMNS)}"
        )
    if len(meta) != n_images:
        raise ValueError(
            f"task metadata has {len(meta)} rows but the image source has {n_images} images; "
            "they must be aligned by position"
        )
    for col in ("label", "split"):
        bad = np.flatnonzero(meta[col].isna().to_numpy())
        if bad.size:
            raise ValueError(f"task metadata column {col!r} is empty at row(s) {bad[:5].tolist()}")
    split = meta["split"].astype(str).to_numpy()
    unknown = np.flatnonzero(~np.isin(split, SPLITS))
    if unknown.size:
        raise ValueError(
            f"task metadata column 'split' has value {split[unknown[0]]!r} at row(s) "
            f"{unknown[:5].tolist()}; expected one of {list(SPLITS)}"
        )
    idx = {s: np.flatnonzero(split == s) for s in SPLITS}
    empty = [s for s in SPLITS if idx[s].size == 0]
    if empty:
        raise ValueError(f"task metadata column 'split' has no rows with value(s) {empty}")

    labels = meta["label"].astype(str)
    classes = task_classes(labels)
    if len(classes) < 2:
        raise ValueError(f"task metadata column 'label' has one class only ({classes}); need >= 2")
    y = np.array(labels.map({c: i for i, c in enumerate(classes)}), dtype=np.int64)
    absent = [c for i, c in enumerate(classes) if not np.any(y[idx["train"]] == i)]
    if absent:
        raise ValueError(f"label value(s) {absent} never occur in split 'train'; cannot learn them")
    if np.unique(y[idx["val"]]).size < 2:
        raise ValueError(
            "split 'val' holds a single label value; model selection by AUROC needs >= 2 classes"
        )
    return _Task(classes=classes, y=y, idx=idx)


# ---------------------------------------------------------------------------------------------
# Shared pieces


def macro_auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest AUROC averaged over the classes present in ``y`` (plain AUROC when K = 2).

    y: (N,) class index; probs: (N, K). A class absent from ``y`` has no AUROC and is left out
    rather than scored; NaN when no class has both positives and negatives. Computed as the
    Mann-Whitney U statistic (average ranks, so ties count one half), the same number as
    ``sklearn.metrics.roc_auc_score`` at a fraction of its per-call cost: it runs every epoch.
    """
    scores = []
    for k in range(probs.shape[1]):
        positive = y == k
        n_pos = int(positive.sum())
        n_neg = len(y) - n_pos
        if n_pos and n_neg:
            ranks = rankdata(probs[:, k])
            scores.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(scores)) if scores else float("nan")


def _schedule(
    optimizer: torch.optim.Optimizer, cfg: AdaptSettings, steps_per_epoch: int
) -> CosineLRScheduler:
    """Per-iteration warm-up then cosine: call ``step_update(step)`` after every update."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total - warmup),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.min_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def _epoch_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[np.ndarray]:
    """Shuffled full batches (the remainder is dropped, as RETFound does: a batch of one
    breaks BatchNorm and adds gradient noise); one batch of all when ``n < batch_size``."""
    order = torch.randperm(n, generator=gen).numpy()
    size = min(batch_size, n)
    for start in range(0, n - size + 1, size):
        yield order[start : start + size]


def _select(history: list[dict[str, float]]) -> int:
    """Best validation AUROC; among equal AUROCs, the lower validation loss."""
    keys = [(-h["val_auroc"], h["val_loss"]) for h in history]
    return min(range(len(keys)), key=keys.__getitem__)


def _predictions(meta: pd.DataFrame, task: _Task, probs: np.ndarray) -> pd.DataFrame:
    rows = task.idx["test"]
    out = pd.DataFrame(
        {
            "image_id": meta["image_id"].to_numpy()[rows],
            "patient_id": meta["patient_id"].to_numpy()[rows],
            "y_true": task.y[rows],
        }
    )
    for k in range(probs.shape[1]):
        out[f"prob_{k}"] = probs[:, k].astype(np.float64)
    for col in METADATA_COLUMNS:
        if col in meta.columns:
            out[col] = meta[col].to_numpy()[rows]
    return out


def _val_metrics(logits: torch.Tensor, y: np.ndarray) -> tuple[float, float, np.ndarray]:
    probs = logits.softmax(-1).double().cpu().numpy()
    loss = F.cross_entropy(logits.float().cpu(), torch.from_numpy(y)).item()
    return macro_auroc(y, probs), loss, probs


@contextmanager
def _single_thread(dev: torch.device) -> Generator[None, None, None]:
    """Intra-op threads only add synchronisation to a probe's tiny (batch, D) ops on CPU; on a
    busy machine they make each op ~20x slower. The caller's thread count is restored."""
    if dev.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# Entry point


def adapt(
    encoder_path: Path,
    images: ImageSource,
    meta: pd.DataFrame,
    cfg: AdaptSettings,
    *,
    seed: int,
    features: np.ndarray | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> AdaptResult:
    """Adapt the encoder saved at ``encoder_path`` to the task (``images`` + ``meta``).

    images: N uint8 (S, S, 3) at the encoder's img_size; meta: N rows aligned by position with
    image_id, patient_id, label, split (train/val/test) and optionally age, sex, ethnicity.
    ``features`` (N, D), from :func:`extract_features`, lets the seeds of a linear probe share
    one encoder pass; fine-tuning ignores it. ``device`` defaults to CUDA when available.
    """
    if not Path(encoder_path).is_file():
        raise FileNotFoundError(f"{encoder_path}: no such encoder file (expected .safetensors)")
    task = _check_task(meta, len(images))
    dev = _device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        encoder, arch, prep, _ = load_encoder(Path(encoder_path))  # its init draws random numbers
        gen = torch.Generator().manual_seed(seed)
        if cfg.method == "linear_probe":
            if features is None:
                features = extract_features(encoder, prep, images, progress=progress, device=dev)
            elif features.shape[0] != len(meta):
                raise ValueError(
                    f"features have {features.shape[0]} rows but the task has {len(meta)} images"
                )
            with _single_thread(dev):
                classifier, history, test_probs = _linear_probe(
                    encoder, prep, features, task, cfg, gen, dev, progress
                )
        else:
            vit = build_encoder(arch, num_classes=len(task.classes), drop_path=cfg.drop_path)
            _load_pretrained(vit, encoder.state_dict(), encoder_path)
            classifier, history, test_probs = _finetune(
                vit, prep, images, task, cfg, gen, dev, progress
            )
    best = _select(history)
    return AdaptResult(
        method=cfg.method,
        seed=seed,
        classes=task.classes,
        predictions=_predictions(meta, task, test_probs),
        val_scores=[h["val_auroc"] for h in history],
        best_epoch=best,
        best_val_auroc=history[best]["val_auroc"],
        history=history,
        classifier=classifier,
    )


def _train_loop(
    model: nn.Module,
    cfg: AdaptSettings,
    n_train: int,
    gen: torch.Generator,
    step: Callable[[np.ndarray], torch.Tensor],
    validate: Callable[[], tuple[float, float]],
    progress: bool,
) -> list[dict[str, float]]:
    """The epoch loop both methods share: ``step(batch rows)`` -> loss, lr updated every
    iteration, ``validate()`` -> (auroc, loss) after each epoch; ``model`` ends holding the
    selected epoch's weights."""
    batch = min(cfg.batch_size, n_train)
    steps_per_epoch = n_train // batch
    probe = cfg.method == "linear_probe"
    lr = (cfg.probe_base_lr if probe else cfg.base_lr) * batch / 256
    optimizer = create_optimizer_v2(
        model,
        "adamw",
        lr=lr,
        weight_decay=cfg.probe_weight_decay if probe else cfg.weight_decay,
        layer_decay=cfg.layer_decay if cfg.method == "finetune" else None,
    )
    scheduler = _schedule(optimizer, cfg, steps_per_epoch)
    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] = {}
    updates = 0
    for epoch in tqdm(range(cfg.epochs), desc=cfg.method, disable=not progress, leave=False):
        model.train()
        losses = []
        for rows in _epoch_batches(n_train, batch, gen):
            loss = step(rows)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}; stopping")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(updates)
            losses.append(loss.item())
        model.eval()
        auroc, val_loss = validate()
        history.append(
            {
                "epoch": float(epoch),
                "train_loss": float(np.mean(losses)),
                "val_loss": val_loss,
                "val_auroc": auroc,
                "lr": max(g["lr"] for g in optimizer.param_groups),
            }
        )
        if _select(history) == epoch:
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return history


# ---------------------------------------------------------------------------------------------
# Linear probe


def _linear_probe(
    encoder: VisionTransformer,
    prep: Preprocessing,
    features: np.ndarray,
    task: _Task,
    cfg: AdaptSettings,
    gen: torch.Generator,
    dev: torch.device,
    progress: bool,
) -> tuple[Classifier, list[dict[str, float]], np.ndarray]:
    x = torch.as_tensor(features, dtype=torch.float32, device=dev)
    y = torch.as_tensor(task.y, device=dev)
    tr, va, te = (torch.as_tensor(task.idx[s], device=dev) for s in SPLITS)
    head = probe_head(x.shape[1], len(task.classes)).to(dev)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def step(rows: np.ndarray) -> torch.Tensor:
        r = tr[torch.as_tensor(rows, device=dev)]
        return criterion(head(x[r]), y[r])

    def validate() -> tuple[float, float]:
        with torch.inference_mode():
            auroc, loss, _ = _val_metrics(head(x[va]), task.y[task.idx["val"]])
        return auroc, loss

    history = _train_loop(head, cfg, len(tr), gen, step, validate, progress)
    with torch.inference_mode():
        test_probs = head(x[te]).softmax(-1).double().cpu().numpy()
    classifier = Classifier.from_probe(encoder.cpu(), head.cpu(), classes=task.classes, prep=prep)
    return classifier, history, test_probs


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def _load_pretrained(
    vit: VisionTransformer, state: dict[str, torch.Tensor], source: Path | str
) -> None:
    """Pre-trained encoder weights into a ViT with a fresh head; only the head may be missing."""
    missing, unexpected = vit.load_state_dict(state, strict=False)
    allowed = {"head.weight", "head.bias"}
    if unexpected or set(missing) - allowed:
        raise ValueError(
            f"{source}: encoder weights do not fit the fine-tuning ViT: missing "
            f"{sorted(set(missing) - allowed)}, unexpected {sorted(unexpected)}"
        )
    head = vit.head
    assert isinstance(head, nn.Linear), "build_encoder(num_classes=K) gives a Linear head"
    nn.init.trunc_normal_(head.weight, std=FINETUNE_HEAD_STD)
    nn.init.zeros_(head.bias)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip + small random resized crop, one affine resample per batch.

    x: (B, 3, S, S) normalised -> (B, 3, S, S). Crop area in CROP_AREA, aspect in CROP_RATIO,
    position uniform inside the image (no padding ever enters).
    """
    b = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    area = uniform(*CROP_AREA)
    ratio = torch.exp(uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (1 - w) * uniform(-1.0, 1.0)
    ty = (1 - h) * uniform(-1.0, 1.0)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _predict_logits(
    vit: nn.Module,
    prep: Preprocessing,
    images: ImageSource,
    rows: np.ndarray,
    batch_size: int,
    dev: torch.device,
) -> torch.Tensor:
    """rows: (M,) -> (M, K) logits, in ``rows`` order."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = prep.normalise(torch.from_numpy(images.take(rows[start : start + batch_size])))
            out.append(vit(batch.to(dev)).float().cpu())
    return torch.cat(out)


def _finetune(
    vit: VisionTransformer,
    prep: Preprocessing,
    images: ImageSource,
    task: _Task,
    cfg: AdaptSettings,
    gen: torch.Generator,
    dev: torch.device,
    progress: bool,
) -> tuple[Classifier, list[dict[str, float]], np.ndarray]:
    vit = vit.to(dev)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    train_rows = task.idx["train"]
    eval_batch = max(cfg.batch_size, 64)

    def step(batch: np.ndarray) -> torch.Tensor:
        rows = np.sort(train_rows[batch])  # sorted: memory-mapped shards read forward
        x = augment(prep.normalise(torch.from_numpy(images.take(rows))).to(dev), gen)
        return criterion(vit(x), torch.as_tensor(task.y[rows], device=dev))

    def validate() -> tuple[float, float]:
        rows = task.idx["val"]
        logits = _predict_logits(vit, prep, images, rows, eval_batch, dev)
        auroc, loss, _ = _val_metrics(logits, task.y[rows])
        return auroc, loss

    history = _train_loop(vit, cfg, len(train_rows), gen, step, validate, progress)
    logits = _predict_logits(vit, prep, images, task.idx["test"], eval_batch, dev)
    test_probs = logits.softmax(-1).double().numpy()
    classifier = Classifier.from_vit(vit.cpu(), classes=task.classes, prep=prep)
    return classifier, history, test_probs
