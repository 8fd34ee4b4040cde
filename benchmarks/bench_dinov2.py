"""One DINOv2 pre-training step: retfm's recipe against lightly's own example loop, same model.

Both sides train the same network: the ``bench`` preset's timm ViT in lightly's
``MaskedVisionTransformerTIMM`` (student and EMA teacher) with lightly's ``DINOv2ProjectionHead``
(the paper's 2048 / 256 / 65536 head, shared by DINO and iBOT), on the same batch of 64 images
with 2 global and 4 local crops, fp32. Two comparisons, each a ratio in the same run:

- **step**: forward + backward + optimiser step + teacher EMA. retfm's
  :class:`~retfm.training.recipes.dinov2.DINOv2Recipe` step (its views made inside, from uint8,
  as in training; Sinkhorn-Knopp centering, the default, and softmax centering, lightly's)
  against the loop body of lightly's ``examples/pytorch/dinov2.py`` (teacher and student passes,
  one head call per view group, DINO + iBOT + KoLeo, weight-decay schedule,
  ``update_momentum``), fed views already made.
- **with augmentation**: the same two steps with their data paths included: retfm's batched
  multi-crop from the packed uint8 batch against the example's ``DINOTransform`` on PIL images
  (what its DataLoader workers run), here in the main process.

Two heads: the demo's (``params.yaml``: 512 / 128 / 4,096) and the paper's (2048 / 256 / 65,536).
The fraction of the machine's fp32 matmul peak counts the FLOPs of one retfm step
(``FlopCounterMode``) against a 2048^3 ``torch.mm`` timed right before each round (the machine
is shared: each round is a pair, the median pair is reported, with process CPU time beside).

Run: ``python benchmarks/bench_dinov2.py`` (writes benchmarks/results/bench_dinov2.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
from lightly.models.utils import random_block_mask, update_momentum
from lightly.transforms.dino_transform import DINOTransform
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from bench_pretrain import MatmulPeak, _per_call  # noqa: E402

from retfm.models.dinov2 import DINOv2  # noqa: E402
from retfm.models.encoder import IMAGENET_MEAN, IMAGENET_STD, Preprocessing  # noqa: E402
from retfm.settings import DINOv2RecipeSettings, PretrainSettings, load_settings  # noqa: E402
from retfm.training.recipes import Progress  # noqa: E402
from retfm.training.recipes.dinov2 import DINOv2Recipe  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_dinov2.json"
LOCAL = 4


class ExampleLoop:
    """The loop body of lightly's examples/pytorch/dinov2.py, on retfm's (identical) network."""

    def __init__(self, model: DINOv2, out_dim: int) -> None:
        # the example's attribute names for the same modules
        self.student_backbone, self.teacher_backbone = model.student, model.teacher
        self.student_head, self.teacher_head = model.student_head, model.teacher_head
        self.dino, self.ibot, self.koleo = DINOLoss(out_dim), IBOTPatchLoss(out_dim), KoLeoLoss()
        params = [p for m in (model.student, model.student_head) for p in m.parameters()]
        self.opt = torch.optim.AdamW(params, lr=1e-3)
        self.step_i = 0

    def step(self, views: list[torch.Tensor]) -> None:
        global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:])
        b = len(global_views)
        seq = self.teacher_backbone.sequence_length
        mask = global_views.new_zeros((b, seq), dtype=torch.bool)
        h, w = self.teacher_backbone.vit.patch_embed.grid_size
        block_mask = random_block_mask(size=(b, h, w), device=mask.device)
        mask[:, 1:] = block_mask.flatten(start_dim=1)
        with torch.no_grad():
            t_feat = self.teacher_backbone.encode(global_views)
            t_cls_out = self.teacher_head(t_feat[:, 0])
            t_masked_out = self.teacher_head(t_feat[mask])
        s_feat = self.student_backbone.encode(global_views, mask=mask)
        s_global_cls = s_feat[:, 0]
        s_global_cls_out = self.student_head(s_global_cls)
        s_global_masked_out = self.student_head(s_feat[mask])
        s_local_cls_out = self.student_head(self.student_backbone.encode(local_views)[:, 0])
        s_cls_out = torch.cat([s_global_cls_out, s_local_cls_out])
        dino = self.dino(t_cls_out.chunk(2), s_cls_out.chunk(len(views)), teacher_temp=0.07)
        ibot = self.ibot(t_masked_out, s_global_masked_out, block_mask, teacher_temp=0.07)
        koleo = 0.1 * sum(self.koleo(t) for t in s_global_cls.chunk(2))
        (dino + ibot + koleo).backward()
        wd = cosine_schedule(self.step_i, 1000, 0.04, 0.4)
        for group in self.opt.param_groups:
            group["weight_decay"] = wd
        self.opt.step()
        self.opt.zero_grad()
        m = cosine_schedule(self.step_i, 1000, 0.992, 1.0)
        update_momentum(self.student_backbone, self.teacher_backbone, m=m)
        update_momentum(self.student_head, self.teacher_head, m=m)
        self.step_i += 1


class RetfmLoop:
    def __init__(self, recipe: DINOv2Recipe, model: DINOv2) -> None:
        self.recipe, self.model = recipe, model
        self.opt = recipe.optimizer(model)
        # past the frozen last layer, like the example
        self.at = Progress(epoch=2.0, step=10, total_steps=1000, steps_per_epoch=10,
                           total_epochs=100)  # fmt: skip

    def step(self, images: torch.Tensor) -> None:
        self.recipe.schedule(self.opt, self.at)
        loss, _ = self.recipe.loss(self.model, images, self.at)
        loss.backward()
        self.recipe.before_step(self.model, self.at)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.recipe.after_step(self.model, self.at)


def _pil_views(transform: DINOTransform, images: np.ndarray) -> list[torch.Tensor]:
    """What the example's DataLoader does per batch: the transform on each PIL image, collated."""
    per_image = [transform(Image.fromarray(img)) for img in images]
    return [torch.stack([views[v] for views in per_image]) for v in range(len(per_image[0]))]


def _rounds(variants: dict, peak: MatmulPeak, reps: int, rounds: int) -> dict[str, list]:
    """Each round times the matmul peak, then every variant once after another (so that a busy
    moment on the shared machine hits all of them alike); returns the rounds per variant."""
    for fn in variants.values():
        _per_call(fn, 1)  # warm-up
    out: dict[str, list] = {name: [] for name in variants}
    for _ in range(rounds):
        peak_wall, peak_cpu = peak.round()
        for name, fn in variants.items():
            wall, cpu = _per_call(fn, reps)
            out[name].append((wall, cpu, peak_wall, peak_cpu))
    return out


def _summary(name: str, pairs: list, batch: int, flops: float, ours: list) -> dict:
    ratios = sorted(p[0] / o[0] for p, o in zip(pairs, ours, strict=True))
    wall, cpu, peak_wall, peak_cpu = sorted(pairs, key=lambda p: p[0])[len(pairs) // 2]
    return {
        "variant": name,
        "step_s": wall,
        "step_cpu_s": cpu,
        "images_per_s": batch / wall,
        "fraction_of_fp32_peak": flops / wall / 1e9 / peak_wall,
        "fraction_of_fp32_peak_cpu_time": flops / cpu / 1e9 / peak_cpu,
        "time_vs_retfm_per_round": ratios,
        "time_vs_retfm_median": ratios[len(ratios) // 2],
        "step_s_all_rounds": [p[0] for p in pairs],
    }


def _config(arch, batch: int, head: tuple[int, int, int], reps: int, rounds: int,
            peak: MatmulPeak) -> dict:  # noqa: ANN001  # fmt: skip
    local = arch.img_size // 2 // arch.patch_size * arch.patch_size
    hidden, bottleneck, out_dim = head

    def recipe(centering: str) -> DINOv2Recipe:
        cfg = PretrainSettings(batch_size=batch, dinov2=DINOv2RecipeSettings(
            local_crops=LOCAL, local_crop_size=local, drop_path=0.0, clip_grad=0.0,
            centering=centering, head_hidden_dim=hidden, head_bottleneck_dim=bottleneck,
            out_dim=out_dim))  # no clipping or drop path: the example's work  # fmt: skip
        return DINOv2Recipe(cfg, arch, Preprocessing(img_size=arch.img_size),
                            images_per_step=batch)  # fmt: skip

    def built(r: DINOv2Recipe) -> DINOv2:
        torch.manual_seed(0)  # the same weights on every side
        return r.build().train()  # (lightly's weight-normed head cannot be deep-copied)

    soft, sk = recipe("softmax"), recipe("sinkhorn_knopp")
    ours, ours_sk = RetfmLoop(soft, built(soft)), RetfmLoop(sk, built(sk))
    theirs = ExampleLoop(built(soft), out_dim)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, arch.img_size, arch.img_size, 3), dtype=np.uint8)
    x = torch.from_numpy(images)
    transform = DINOTransform(global_crop_size=arch.img_size, local_crop_size=local,
                              n_local_views=LOCAL, global_crop_scale=(0.32, 1.0),
                              local_crop_scale=(0.05, 0.32),
                              normalize={"mean": list(IMAGENET_MEAN),
                                         "std": list(IMAGENET_STD)})  # fmt: skip
    views = _pil_views(transform, images)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = soft.loss(ours.model, x, ours.at)
        loss.backward()
    flops = float(counter.get_total_flops())
    ours.model.zero_grad(set_to_none=True)

    def example_with_pil() -> None:
        theirs.step(_pil_views(transform, images))

    variants = {
        "retfm (sinkhorn_knopp, the default)": lambda: ours_sk.step(x),
        "retfm (softmax centering)": lambda: ours.step(x),
        "lightly example, views given": lambda: theirs.step(views),
        "lightly example + DINOTransform (PIL)": example_with_pil,
    }
    timed = _rounds(variants, peak, reps, rounds)
    first = timed["retfm (sinkhorn_knopp, the default)"]
    rows = [_summary(name, pairs, batch, flops, first) for name, pairs in timed.items()]
    print(f"head {hidden}/{bottleneck}/{out_dim}, 2 global + {LOCAL} local ({local} px) crops, "
          f"batch {batch}: {flops / 1e9:.1f} GFLOP per fwd+bwd")  # fmt: skip
    print(f"  {'variant':<46}{'step s':>8}{'cpu s':>8}{'img/s':>8}{'of peak':>9}{'(cpu)':>7}"
          f"{'time / retfm':>14}")  # fmt: skip
    for r in rows:
        print(f"  {r['variant']:<46}{r['step_s']:>8.3f}{r['step_cpu_s']:>8.3f}"
              f"{r['images_per_s']:>8.1f}{r['fraction_of_fp32_peak']:>9.0%}"
              f"{r['fraction_of_fp32_peak_cpu_time']:>7.0%}"
              f"{r['time_vs_retfm_median']:>14.2f}")  # fmt: skip
    return {"head": list(head), "local_crop_size": local, "flops_per_step": flops,
            "variants": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    settings = load_settings(args.params)
    arch, demo = settings.model.presets[args.preset], settings.pretrain.dinov2
    print(f"preset {args.preset}: img {arch.img_size} patch {arch.patch_size} dim "
          f"{arch.embed_dim} depth {arch.depth} | threads {args.threads}")  # fmt: skip
    peak = MatmulPeak(torch.float32)
    print(f"fp32 matmul 2048^3: {max(peak.round()[0] for _ in range(3)):.1f} GFLOP/s")
    configs = {
        "demo head (params.yaml)": (demo.head_hidden_dim, demo.head_bottleneck_dim, demo.out_dim),
        "paper head": (2048, 256, 65536),
    }
    results = {}
    for label, head in configs.items():
        print(label)
        results[label] = _config(arch, args.batch, head, args.reps, args.rounds, peak)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {"preset": args.preset, "arch": arch.model_dump(), "batch": args.batch,
                   "local_crops": LOCAL, "threads": args.threads, "rounds": args.rounds,
                   "reps": args.reps},
        "machine": {"processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M")},
        "results": results,
    }  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
