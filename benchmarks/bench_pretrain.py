"""How close does one MAE pre-training step get to this machine's matmul peak?

Measures training throughput (forward + backward + AdamW step on a fixed, already augmented
batch, after warm-up) for the ``bench`` preset, the achieved GFLOP/s (FLOPs of one fwd+bwd
counted by ``torch.utils.flop_counter.FlopCounterMode``) and, in the same run, the fp32 (and bf16)
``torch.mm`` peak of a 2048^3 product. Then repeats the step with bf16 autocast and with
``torch.compile`` so the recipe can keep the faster setting (``pretrain.amp``).

Run: ``python benchmarks/bench_pretrain.py`` (writes benchmarks/results/bench_pretrain.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from retfm.models.mae import MaskedAutoencoder
from retfm.settings import PretrainSettings, load_settings
from retfm.training.pretrain import build_optimizer

RESULTS = Path(__file__).parent / "results" / "bench_pretrain.json"


def _timed(fn: Callable[[], object], warmup: int, reps: int, rounds: int = 3) -> float:
    """Median over ``rounds`` of the mean seconds per call (the machine is shared and noisy)."""
    for _ in range(warmup):
        fn()
    means = []
    for _ in range(rounds):
        tic = time.perf_counter()
        for _ in range(reps):
            fn()
        means.append((time.perf_counter() - tic) / reps)
    return statistics.median(means)


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """GFLOP/s of an n^3 ``torch.mm`` in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = _timed(lambda: torch.mm(a, b), warmup=2, reps=5)
    return 2 * n**3 / seconds / 1e9


def _variant(
    name: str,
    mae: MaskedAutoencoder,
    x: torch.Tensor,
    *,
    bf16: bool,
    compiled: bool,
    flops: float,
    warmup: int,
    reps: int,
) -> dict[str, float | str]:
    model = torch.compile(mae) if compiled else mae
    opt = build_optimizer(mae, PretrainSettings(), lr=1e-4)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with amp:
            loss, _, _ = model(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    tic = time.perf_counter()
    step()  # the first call includes compilation
    first = time.perf_counter() - tic
    seconds = _timed(step, warmup=warmup, reps=reps)
    return {
        "variant": name,
        "step_s": seconds,
        "images_per_s": x.shape[0] / seconds,
        "gflops_per_s": flops / seconds / 1e9,
        "first_step_s": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    settings = load_settings(args.params)
    arch = settings.model.presets[args.preset]
    mask_ratio = settings.pretrain.mask_ratio
    torch.manual_seed(0)
    mae = MaskedAutoencoder(arch, mask_ratio=mask_ratio, norm_pix_loss=True).train()
    x = torch.randn(args.batch, 3, arch.img_size, arch.img_size)

    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _ = mae(x)
        loss.backward()
    mae.zero_grad(set_to_none=True)
    flops = float(counter.get_total_flops())

    peak_fp32 = matmul_peak(torch.float32)
    peak_bf16 = matmul_peak(torch.bfloat16)
    plan = [("fp32 eager", False, False), ("bf16 autocast eager", True, False)]
    if not args.no_compile:
        plan += [("fp32 compile", False, True), ("bf16 autocast compile", True, True)]
    rows = []
    for name, bf16, compiled in plan:
        torch.manual_seed(0)
        fresh = MaskedAutoencoder(arch, mask_ratio=mask_ratio, norm_pix_loss=True).train()
        try:
            row = _variant(
                name,
                fresh,
                x,
                bf16=bf16,
                compiled=compiled,
                flops=flops,
                warmup=args.warmup,
                reps=args.reps,
            )
        except Exception as err:  # e.g. no C++ toolchain for inductor: report, keep going
            row = {"variant": name, "error": f"{type(err).__name__}: {err}"[:300]}
        if "gflops_per_s" in row:
            peak = peak_bf16 if bf16 else peak_fp32
            row["fraction_of_fp32_peak"] = float(row["gflops_per_s"]) / peak_fp32
            row["fraction_of_own_dtype_peak"] = float(row["gflops_per_s"]) / peak
        rows.append(row)
        torch._dynamo.reset()

    base = rows[0]["step_s"]
    for row in rows:
        if "step_s" in row:
            row["speedup_vs_fp32_eager"] = float(base) / float(row["step_s"])
    timed = [r for r in rows if "step_s" in r]
    fastest = min(timed, key=lambda r: float(r["step_s"]))["variant"]

    print(
        f"preset {args.preset}: img {arch.img_size} patch {arch.patch_size} dim "
        f"{arch.embed_dim} depth {arch.depth} | decoder {arch.decoder_embed_dim}x"
        f"{arch.decoder_depth} | batch {args.batch} mask {mask_ratio} threads {args.threads}"
    )
    print(f"fwd+bwd FLOPs per step: {flops / 1e9:.2f} GFLOP")
    print(f"matmul peak 2048^3: fp32 {peak_fp32:.1f} GFLOP/s, bf16 {peak_bf16:.1f} GFLOP/s")
    print(
        f"{'variant':<24}{'step s':>9}{'img/s':>9}{'GFLOP/s':>10}{'of fp32 pk':>12}"
        f"{'speedup':>9}{'1st step s':>12}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<24} failed: {r['error']}")
            continue
        print(
            f"{r['variant']:<24}{r['step_s']:>9.3f}{r['images_per_s']:>9.1f}"
            f"{r['gflops_per_s']:>10.1f}{r['fraction_of_fp32_peak']:>12.0%}"
            f"{r['speedup_vs_fp32_eager']:>9.2f}{r['first_step_s']:>12.1f}"
        )
    print(f"fastest: {fastest}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "config": {
                    "preset": args.preset,
                    "arch": arch.model_dump(),
                    "batch": args.batch,
                    "mask_ratio": mask_ratio,
                    "threads": args.threads,
                },
                "machine": {
                    "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__,
                },
                "flops_per_step": flops,
                "matmul_peak_gflops": {"fp32": peak_fp32, "bf16": peak_bf16},
                "variants": rows,
                "fastest": fastest,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
