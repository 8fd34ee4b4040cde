"""Adapt a pre-trained FM encoder to one downstream task, for one seed (RETFound's recipe).

Three methods (``adapt.method``), one contract:

- ``finetune`` (RETFound ``main_finetune.py``): the whole ViT plus a fresh Linear head
  (``trunc_normal(std=2e-5)``), AdamW with layer-wise lr decay
  (``timm.optim.create_optimizer_v2``), drop path, RETFound's training transforms
  (:mod:`retfm.training.transforms`: random resized crop, flip, RandAugment, random erasing).
- ``retfound_lp`` (RETFound ``--adaptation lp``): the same recipe with every encoder weight
  frozen (only ``head.*`` trains; drop path stays active, as in RETFound, which trains in
  ``model.train()`` mode); its head is a plain Linear on the pooled features.
- ``mae_linprobe`` (MAE ``main_linprobe.py``): a BatchNorm(affine=False) + Linear head on
  features computed once on the evaluation view, with MAE's probe settings
  ``probe_base_lr`` (0.1) and ``probe_weight_decay`` (0). Departures, for speed: AdamW instead of
  LARS, and no augmentation (MAE's probe crops and flips), so every seed trains on one cached
  (N, D) matrix in milliseconds.

All: effective lr = base_lr x batch / 256; linear warm-up for ``warmup_epochs`` then cosine to
``min_lr``, set every iteration (``timm.scheduler.CosineLRScheduler``); cross-entropy (label
smoothing ``label_smoothing``, 0 as current RETFound); after each epoch the validation split
is scored and the selected epoch (``adapt.selection``) is kept in memory; the test split is
predicted once, with it. ``retfound`` selection is RETFound's (``engine_finetune.evaluate``):
the mean of macro F1, macro one-vs-rest AUROC and Cohen's kappa of the argmax predictions,
the earliest epoch among equal scores (:func:`retfound_score`); ``auroc`` selects on macro
AUROC, ties to the lower validation loss. Everything random (head init, drop path, shuffles,
augmentation) derives from ``seed``; the caller's global RNG state is left untouched.
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
from sklearn.metrics import cohen_kappa_score, f1_score
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm.auto import tqdm

from retfm.data.images import ImageSource
from retfm.models.classifier import Classifier, probe_head
from retfm.models.encoder import Preprocessing, build_encoder, load_encoder
from retfm.settings import AdaptSettings
from retfm.training import transforms
from retfm.training.features import extract_features

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("image_id", "patient_id", "label", "split")
METADATA_COLUMNS = ("age", "sex", "ethnicity")
# RETFound initialises the fine-tuning head almost at zero so the first steps barely move the
# pre-trained encoder.
FINETUNE_HEAD_STD = 2e-5


@dataclass
class AdaptResult:
    """One (encoder, task, method, seed) adaptation.

    ``predictions``: one row per test image: image_id, patient_id, y_true (class index),
    prob_0..prob_{K-1}, then age/sex/ethnicity where the task has them. ``val_scores[e]`` is the
    validation score the selection reads after epoch ``e`` (epochs count from 0); ``history[e]``
    adds train/val loss, val AUROC, F1, kappa and the lr at the end of that epoch.
    ``classifier`` holds the selected epoch's weights.
    """

    method: str
    seed: int
    classes: list[str]
    predictions: pd.DataFrame
    val_scores: list[float]
    best_epoch: int
    best_val_score: float
    history: list[dict[str, float]]
    classifier: Classifier = field(repr=False)

    @property
    def best_val_auroc(self) -> float:
        return self.history[self.best_epoch]["val_auroc"]


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


def retfound_score(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """RETFound's validation score (``engine_finetune.evaluate``): (F1 + AUROC + kappa) / 3 with
    F1 macro over every class of the argmax predictions (``zero_division=0``), AUROC the macro
    one-vs-rest AUROC of the probabilities and kappa Cohen's (unweighted) of the argmax.
    y: (N,) class index; probs: (N, K). A class absent from ``y`` has no AUROC and is left out
    of the mean (RETFound's sklearn call would give NaN and never select that epoch)."""
    pred = probs.argmax(axis=1)
    f1 = float(f1_score(y, pred, labels=list(range(probs.shape[1])), average="macro",
                        zero_division=0))  # fmt: skip
    auroc = macro_auroc(y, probs)
    kappa = float(cohen_kappa_score(y, pred)) if np.unique(np.r_[y, pred]).size > 1 else 0.0
    return {"f1": f1, "auroc": auroc, "kappa": kappa, "score": (f1 + auroc + kappa) / 3}


def _select(history: list[dict[str, float]], selection: str = "retfound") -> int:
    """The selected epoch. ``retfound``: the highest score, the earliest among equals
    (RETFound saves a checkpoint only when the score beats the best so far). ``auroc``: the
    best validation AUROC, the lower validation loss among equals."""
    if selection == "retfound":
        scores = [h["val_score"] for h in history]
        return int(np.argmax(np.nan_to_num(scores, nan=-np.inf)))
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


def _val_metrics(logits: torch.Tensor, y: np.ndarray) -> dict[str, float]:
    probs = logits.softmax(-1).double().cpu().numpy()
    loss = F.cross_entropy(logits.float().cpu(), torch.from_numpy(y)).item()
    scores = retfound_score(y, probs)
    return {"val_loss": loss, "val_auroc": scores["auroc"], "val_f1": scores["f1"],
            "val_kappa": scores["kappa"], "val_score": scores["score"]}  # fmt: skip


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
    with (
        torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []),
        transforms.seeded(seed),
    ):
        torch.manual_seed(seed)
        encoder, spec, prep, _ = load_encoder(Path(encoder_path))
        gen = torch.Generator().manual_seed(seed)
        if cfg.method == "mae_linprobe":
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
            vit = build_encoder(spec, num_classes=len(task.classes), drop_path=cfg.drop_path)
            _load_pretrained(vit, encoder.state_dict(), encoder_path)
            if cfg.method == "retfound_lp":  # RETFound: requires_grad = ("head" in name)
                for name, param in vit.named_parameters():
                    param.requires_grad_(name.startswith("head."))
            classifier, history, test_probs = _finetune(
                vit, prep, images, task, cfg, gen, dev, progress
            )
    best = _select(history, cfg.selection)
    key = "val_score" if cfg.selection == "retfound" else "val_auroc"
    return AdaptResult(
        method=cfg.method,
        seed=seed,
        classes=task.classes,
        predictions=_predictions(meta, task, test_probs),
        val_scores=[h[key] for h in history],
        best_epoch=best,
        best_val_score=history[best][key],
        history=history,
        classifier=classifier,
    )


def _train_loop(
    model: nn.Module,
    cfg: AdaptSettings,
    n_train: int,
    gen: torch.Generator,
    step: Callable[[np.ndarray], torch.Tensor],
    validate: Callable[[], dict[str, float]],
    progress: bool,
) -> list[dict[str, float]]:
    """The epoch loop every method shares: ``step(batch rows)`` -> loss, lr updated every
    iteration, ``validate()`` -> the validation metrics after each epoch; ``model`` ends
    holding the selected epoch's weights."""
    batch = min(cfg.batch_size, n_train)
    steps_per_epoch = n_train // batch
    probe = cfg.method == "mae_linprobe"
    lr = (cfg.probe_base_lr if probe else cfg.base_lr) * batch / 256
    optimizer = create_optimizer_v2(  # skips frozen parameters (retfound_lp: the head only)
        model,
        "adamw",
        lr=lr,
        weight_decay=cfg.probe_weight_decay if probe else cfg.weight_decay,
        layer_decay=None if probe else cfg.layer_decay,
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
        history.append(
            {
                "epoch": float(epoch),
                "train_loss": float(np.mean(losses)),
                **validate(),
                "lr": max(g["lr"] for g in optimizer.param_groups),
            }
        )
        if _select(history, cfg.selection) == epoch:
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

    def validate() -> dict[str, float]:
        with torch.inference_mode():
            return _val_metrics(head(x[va]), task.y[task.idx["val"]])

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


def _predict_logits(
    vit: nn.Module,
    prep: Preprocessing,
    images: ImageSource,
    rows: np.ndarray,
    batch_size: int,
    dev: torch.device,
) -> torch.Tensor:
    """rows: (M,) -> (M, K) logits on the evaluation view, in ``rows`` order."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = prep.eval_batch(images.take(rows[start : start + batch_size]))
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
    augment = transforms.train_transform(prep, cfg)

    def step(batch: np.ndarray) -> torch.Tensor:
        rows = np.sort(train_rows[batch])  # sorted: memory-mapped shards read forward
        x = transforms.train_batch(images.take(rows), augment).to(dev)
        return criterion(vit(x), torch.as_tensor(task.y[rows], device=dev))

    def validate() -> dict[str, float]:
        rows = task.idx["val"]
        logits = _predict_logits(vit, prep, images, rows, eval_batch, dev)
        return _val_metrics(logits, task.y[rows])

    history = _train_loop(vit, cfg, len(train_rows), gen, step, validate, progress)
    logits = _predict_logits(vit, prep, images, task.idx["test"], eval_batch, dev)
    test_probs = logits.softmax(-1).double().numpy()
    classifier = Classifier.from_vit(vit.cpu(), classes=task.classes, prep=prep)
    return classifier, history, test_probs
