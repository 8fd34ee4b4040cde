"""Pre-training an FM with any recipe: one function, resumable, alone or under ``torchrun``.

The loop follows MAE's ``train_one_epoch``: the recipe's schedules are set every iteration,
gradients may be accumulated over several micro-batches, and a non-finite loss stops the run at
once. What one step computes is the recipe's (:mod:`retfm.training.recipes`: MAE, DINOv2).
Everything a resumed run needs to continue *exactly* (the recipe's module, e.g. student, teacher
and loss centres; optimizer moments; position in the epoch; every rank's RNG state; the loss
history) is in one atomically written checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retfm.data.images import ImageSource
from retfm.models.encoder import Preprocessing, save_encoder
from retfm.settings import ModelPreset, PretrainSettings
from retfm.training import distributed as dist_
from retfm.training.recipes import Progress, Recipe, recipe_class

CHECKPOINT_NAME = "checkpoint.pt"
ENCODER_NAME = "encoder.safetensors"
HISTORY_NAME = "history.csv"
LogFn = Callable[[dict[str, float], int], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped rather than write garbage weights."""

    def __init__(self, loss: float, step: int, epoch: int, lr: float) -> None:
        self.loss, self.step, self.epoch, self.lr = loss, step, epoch, lr
        super().__init__(
            f"loss is {loss} at optimizer step {step} (epoch {epoch}, lr {lr:.3g}); "
            "stopping. Lower the recipe's base_lr (pretrain.<recipe>.base_lr), raise its "
            "warmup_epochs or turn off pretrain.amp, then delete the checkpoint and rerun."
        )


class CheckpointMismatchError(ValueError):
    """A checkpoint exists in the output folder but was written by a different run."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished pre-training run produced (``history``: (step, loss, lr) per step)."""

    encoder_path: Path
    steps: int
    epochs: int
    final_loss: float
    history: list[tuple[int, float, float]] = field(default_factory=list)
    param_digest: str = ""


# ---------------------------------------------------------------------------- state
def fingerprint(
    cfg: PretrainSettings,
    arch: ModelPreset,
    seed: int,
    n_images: int,
    world_size: int = 1,
    *,
    recipe: str,
) -> str:
    """A hash of everything that decides what a run computes; a checkpoint only resumes a run
    with the same fingerprint."""
    blob = json.dumps(
        {
            "recipe": recipe,
            "pretrain": cfg.for_recipe(recipe),
            "arch": arch.model_dump(mode="json"),
            "seed": seed,
            "n_images": n_images,
            "world_size": world_size,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain lists (loadable with weights_only)."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_kind,
            torch.from_numpy(np_keys.astype(np.int64)),
            np_pos,
            np_has_gauss,
            np_gauss,
        ],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise CheckpointMismatchError(
            f"{path}: cannot read the pre-training checkpoint ({err}); delete it to start over"
        ) from err


def read_checkpoint_extra(out_dir: Path) -> dict[str, str] | None:
    """The ``extra`` dict stored in ``out_dir``'s checkpoint (e.g. the MLflow run id to resume
    logging into), or ``None`` when there is no checkpoint."""
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return dict(_read_checkpoint(path).get("extra", {}))


def _param_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _check_inputs(images: ImageSource, arch: ModelPreset, prep: Preprocessing) -> int:
    n = len(images)
    if n == 0:
        raise ValueError("pre-training needs images; the image source is empty")
    if prep.img_size != arch.img_size:
        raise ValueError(
            f"preprocessing img_size {prep.img_size} != model img_size {arch.img_size}"
        )
    sample = images.take(np.array([0]))
    expected = (1, arch.img_size, arch.img_size, 3)
    if sample.dtype != np.uint8 or tuple(sample.shape) != expected:
        raise ValueError(
            f"image source gives {sample.dtype} {tuple(sample.shape)} per image; expected uint8 "
            f"{expected} (pack images at the model's img_size)"
        )
    return n


def pretrain_fm(
    recipe: str,
    cfg: PretrainSettings,
    arch: ModelPreset,
    images: ImageSource,
    out_dir: Path,
    *,
    seed: int,
    prep: Preprocessing,
    log_fn: LogFn | None = None,
    extra: dict[str, str] | None = None,
    progress: bool = True,
    log_every: int = 10,
) -> TrainResult:
    """Pre-train an FM with ``recipe`` (``mae``, ``dinov2``) on ``images``; write
    ``encoder.safetensors`` and ``history.csv`` into ``out_dir``; return a :class:`TrainResult`.

    Resumes from ``out_dir/checkpoint.pt`` when it belongs to the same run (same fingerprint).
    Under ``torchrun`` every process calls this; only rank 0 logs and writes files.
    ``log_fn(metrics, step)`` gets loss, lr, epoch, images/s and the recipe's statistics (means
    over the last ``log_every`` steps).
    """
    out_dir = Path(out_dir)
    cls = recipe_class(recipe)
    n = _check_inputs(images, arch, prep)
    torch.set_num_threads(cfg.num_threads)
    with dist_.distributed_context() as ctx:
        return _Trainer(cls, cfg, arch, images, n, out_dir, seed, prep, ctx, extra or {}).run(
            log_fn, progress, max(1, log_every)
        )


class _Trainer:
    """The state of one run; split from :func:`pretrain_fm` only to keep each method short."""

    def __init__(
        self,
        recipe_cls: type[Recipe],
        cfg: PretrainSettings,
        arch: ModelPreset,
        images: ImageSource,
        n: int,
        out_dir: Path,
        seed: int,
        prep: Preprocessing,
        ctx: dist_.DistContext,
        extra: dict[str, str],
    ) -> None:
        self.cfg, self.arch, self.images, self.out_dir = cfg, arch, images, out_dir
        self.seed, self.prep, self.ctx, self.extra = seed, prep, ctx, dict(extra)
        per_rank = n // ctx.world_size
        iters = per_rank // cfg.batch_size
        self.iters = iters - iters % cfg.accum_steps
        if self.iters == 0:
            raise ValueError(
                f"{n} images are too few for batch_size {cfg.batch_size} x accum_steps "
                f"{cfg.accum_steps} x {ctx.world_size} process(es): no full step per epoch"
            )
        self.n = n
        self.steps_per_epoch = self.iters // cfg.accum_steps
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.recipe = recipe_cls(
            cfg,
            arch,
            prep,
            images_per_step=cfg.batch_size * cfg.accum_steps * ctx.world_size,
        )
        self.fp = fingerprint(cfg, arch, seed, n, ctx.world_size, recipe=recipe_cls.name)
        self.ckpt_path = out_dir / CHECKPOINT_NAME

        _seed_all(seed)  # every rank builds the same weights (a teacher too, which DDP won't sync)
        self.model = self.recipe.build()
        _seed_all(seed + ctx.rank)  # each rank its own augmentations
        self.model.to(ctx.device)
        self.optimizer = self.recipe.optimizer(self.model)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: list[tuple[int, int, float, float]] = []
        self._resume()

    # -------------------------------------------------------------- checkpoints
    def _resume(self) -> None:
        if not self.ckpt_path.is_file():
            return
        state = _read_checkpoint(self.ckpt_path)
        if state.get("fingerprint") != self.fp:
            raise CheckpointMismatchError(
                f"{self.ckpt_path} was written by a run with other settings (fingerprint "
                f"{state.get('fingerprint')} != {self.fp}: recipe, pretrain params, model arch, "
                f"seed, image count {self.n} or process count). Delete the checkpoint to start "
                "over, or restore the params it was written with to resume it."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.history = [tuple(row) for row in state["history"]]  # type: ignore[misc]
        self.extra = {**dict(state.get("extra", {})), **self.extra}
        rng = state["rng"]
        _set_rng_state(rng[self.ctx.rank] if self.ctx.rank < len(rng) else rng[0])

    def _save(self, epoch: int, step_in_epoch: int) -> None:
        rng = dist_.gather_to_main(_rng_state(), self.ctx)  # a collective: every rank calls it
        if not self.ctx.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": self.global_step,
                "rng": rng,
                "fingerprint": self.fp,
                "history": self.history,
                "extra": self.extra,
            },
            self.ckpt_path,
        )

    # -------------------------------------------------------------- training
    def _epoch_batches(self, epoch: int) -> np.ndarray:
        """(iters, batch) image indices of this rank: a permutation fixed by (seed, epoch), so
        a resumed run sees the same order and can skip what it already consumed."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        mine = dist_.shard(order, self.ctx)
        return mine[: self.iters * self.cfg.batch_size].reshape(self.iters, self.cfg.batch_size)

    def _progress(self, epoch: int, it: int) -> Progress:
        return Progress(
            epoch=epoch + it / self.iters,
            step=self.global_step,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            total_epochs=self.cfg.epochs,
        )

    def _micro_step(
        self, net: torch.nn.Module, indices: np.ndarray, sync: bool, at: Progress
    ) -> tuple[float, dict[str, float]]:
        batch = torch.from_numpy(self.images.take(indices)).to(self.ctx.device, non_blocking=True)
        no_sync = getattr(net, "no_sync", None)
        with nullcontext() if sync or no_sync is None else no_sync():
            with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
                loss, stats = self.recipe.loss(net, batch, at)
            value = dist_.mean_across(float(loss.item()), self.ctx)
            if not math.isfinite(value):
                lr = self.optimizer.param_groups[0]["lr"]
                raise NonFiniteLossError(value, self.global_step + 1, self.epoch, lr)
            (loss / self.cfg.accum_steps).backward()
        return value, stats

    def run(self, log_fn: LogFn | None, progress: bool, log_every: int) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        net = dist_.wrap(self.model, ctx)
        net.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.global_step,
            desc=f"{self.recipe.name} pretrain",
            disable=not (progress and ctx.is_main),
            dynamic_ncols=True,
        )
        images_per_step = self.recipe.images_per_step
        window: list[dict[str, float]] = []
        tic, steps_since = time.perf_counter(), 0
        self.optimizer.zero_grad(set_to_none=True)
        for epoch in range(self.epoch, cfg.epochs):
            self.epoch = epoch
            batches = self._epoch_batches(epoch)
            start = self.step_in_epoch * cfg.accum_steps  # > 0 only in a resumed epoch
            micro: list[float] = []
            micro_stats: list[dict[str, float]] = []
            for it in range(start, self.iters):
                at = self._progress(epoch, it)
                if it % cfg.accum_steps == 0:
                    values = self.recipe.schedule(self.optimizer, at)
                sync = (it + 1) % cfg.accum_steps == 0
                value, stats = self._micro_step(net, batches[it], sync, at)
                micro.append(value)
                micro_stats.append(stats)
                if not sync:
                    continue
                values = {**values, **self.recipe.before_step(self.model, at)}
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                self.step_in_epoch = (it + 1) // cfg.accum_steps
                values = {**values, **self.recipe.after_step(self.model, at)}
                step_loss = float(np.mean(micro))
                lr = values["lr"]
                self.history.append((self.global_step, epoch, step_loss, lr))
                window.append({"loss": step_loss, **values, **_mean_stats(micro_stats)})
                micro, micro_stats = [], []
                steps_since += 1
                bar.update(1)
                mid_epoch = self.step_in_epoch < self.steps_per_epoch
                if mid_epoch and self.global_step % cfg.checkpoint_every_steps == 0:
                    self._save(epoch, self.step_in_epoch)
                if self.global_step % log_every == 0 or not mid_epoch:
                    elapsed = max(time.perf_counter() - tic, 1e-9)
                    metrics = {
                        **_mean_stats(window),
                        "lr": lr,
                        "epoch": epoch + self.step_in_epoch / self.steps_per_epoch,
                        "images_per_s": steps_since * images_per_step / elapsed,
                    }
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
                    if log_fn is not None and ctx.is_main:
                        log_fn(metrics, self.global_step)
                    self.recipe.check(metrics, self._progress(epoch, it + 1))
                    window, tic, steps_since = [], time.perf_counter(), 0
            self.step_in_epoch = 0
            self._save(epoch + 1, 0)
        bar.close()
        return self._finish()

    def _finish(self) -> TrainResult:
        encoder_path = self.out_dir / ENCODER_NAME
        encoder = self.recipe.encoder(self.model)
        digest = _param_digest(encoder)
        digests = dist_.gather_to_main(digest, self.ctx)
        if self.ctx.is_main:
            if digests is not None and len(set(digests)) > 1:
                raise RuntimeError(f"data-parallel ranks ended with different weights: {digests}")
            # Only what the weights are: a tracking run id (kept in ``extra``, for resuming) would
            # give identical weights a new file hash on every run and in every store.
            meta = {
                "recipe": self.recipe.cfg.recipe,
                "fingerprint": self.fp,
                "global_step": str(self.global_step),
            }
            save_encoder(encoder_path, encoder, self.recipe.spec(), self.prep, extra=meta)
            _write_history(self.out_dir / HISTORY_NAME, self.history)
        dist_.barrier(self.ctx)
        last_epoch = [loss for _, e, loss, _ in self.history if e == self.cfg.epochs - 1]
        final = float(np.mean(last_epoch)) if last_epoch else float("nan")
        return TrainResult(
            encoder_path=encoder_path,
            steps=self.global_step,
            epochs=self.cfg.epochs,
            final_loss=final,
            history=[(s, loss, lr) for s, _, loss, lr in self.history],
            param_digest=digest,
        )


def _mean_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each statistic over ``rows`` (those a row lacks are left out of its mean)."""
    keys = {k for row in rows for k in row}
    return {k: float(np.mean([row[k] for row in rows if k in row])) for k in sorted(keys)}


def _write_history(path: Path, history: list[tuple[int, int, float, float]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "epoch", "loss", "lr"])
        writer.writerows(history)
    os.replace(tmp, path)
