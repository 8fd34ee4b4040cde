"""How close does one MAE pre-training step get to this machine's matmul peak?

Measures training throughput (forward + backward + AdamW step on a fixed, already augmented
batch, after warm-up) for the ``bench`` preset, the achieved GFLOP/s (FLOPs of one fwd+bwd
counted by ``torch.utils.flop_counter.FlopCounterMode``) and the fp32 ``torch.mm`` peak of a
2048^3 product. Then repeats the step with bf16 autocast and with ``torch.compile`` so the
recipe can keep the faster setting (``pretrain.amp``).

The machine is shared: other processes take CPU time at unpredictable moments. So every timing
round of the step is paired with a matmul-peak round taken right before it, the fraction of
peak is computed per pair, and the median pair is reported; process CPU time is recorded next
to wall time, and the CPU-time fraction (GFLOP per CPU-second of the step over that of the
matmul) is the figure least distorted by time slicing.

Run: ``python benchmarks/bench_pretrain.py`` (writes benchmarks/results/bench_pretrain.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from retfm.models.mae import MaskedAutoencoder
from retfm.settings import PretrainSettings, load_settings
from retfm.training.recipes.mae import build_optimizer

RESULTS = Path(__file__).parent / "results" / "bench_pretrain.json"
MM_N = 2048


def _per_call(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call, averaged over ``reps`` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - wall) / reps, (time.process_time() - cpu) / reps


class MatmulPeak:
    """The n^3 ``torch.mm`` as a reference: GFLOP per wall second and per CPU second."""

    def __init__(self, dtype: torch.dtype, n: int = MM_N) -> None:
        self.a, self.b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        self.flops = 2.0 * n**3
        _per_call(self._mm, 2)  # warm-up

    def _mm(self) -> None:
        torch.mm(self.a, self.b)

    def round(self, reps: int = 3) -> tuple[float, float]:
        wall, cpu = _per_call(self._mm, reps)
        return self.flops / wall / 1e9, self.flops / cpu / 1e9


def _variant(
    name: str,
    mae: MaskedAutoencoder,
    x: torch.Tensor,
    peak: MatmulPeak,
    *,
    bf16: bool,
    compiled: bool,
    flops: float,
    warmup: int,
    reps: int,
    rounds: int,
) -> dict[str, float | str]:
    model = torch.compile(mae) if compiled else mae
    opt = build_optimizer(mae, PretrainSettings().mae, lr=1e-4)
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
    _per_call(step, warmup)
    pairs = []
    for _ in range(rounds):
        peak_wall, peak_cpu = peak.round()
        wall, cpu = _per_call(step, reps)
        pairs.append((wall, cpu, peak_wall, peak_cpu))
    pairs.sort(key=lambda p: p[0])
    wall, cpu, peak_wall, peak_cpu = pairs[len(pairs) // 2]  # the median-wall round
    return {
        "variant": name,
        "step_s": wall,
        "step_cpu_s": cpu,
        "images_per_s": x.shape[0] / wall,
        "gflops_per_s": flops / wall / 1e9,
        "peak_gflops_per_s_same_round": peak_wall,
        "fraction_of_fp32_peak": (flops / wall / 1e9) / peak_wall,
        "fraction_of_fp32_peak_cpu_time": (flops / cpu / 1e9) / peak_cpu,
        "step_s_all_rounds": [p[0] for p in pairs],
        "first_step_s": first,
    }


def _print_table(rows: list[dict[str, float | str]]) -> None:
    print(
        f"{'variant':<24}{'step s':>8}{'cpu s':>8}{'img/s':>8}{'GFLOP/s':>9}{'peak':>7}"
        f"{'of peak':>9}{'(cpu)':>7}{'speedup':>9}{'1st s':>8}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<24} failed: {r['error']}")
            continue
        print(
            f"{r['variant']:<24}{r['step_s']:>8.3f}{r['step_cpu_s']:>8.3f}"
            f"{r['images_per_s']:>8.1f}{r['gflops_per_s']:>9.1f}"
            f"{r['peak_gflops_per_s_same_round']:>7.0f}{r['fraction_of_fp32_peak']:>9.0%}"
            f"{r['fraction_of_fp32_peak_cpu_time']:>7.0%}{r['speedup_vs_fp32_eager']:>9.2f}"
            f"{r['first_step_s']:>8.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    settings = load_settings(args.params)
    arch = settings.model.presets[args.preset]
    mask_ratio = settings.pretrain.mae.mask_ratio
    torch.manual_seed(0)
    mae = MaskedAutoencoder(arch, mask_ratio=mask_ratio, norm_pix_loss=True).train()
    x = torch.randn(args.batch, 3, arch.img_size, arch.img_size)

    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _ = mae(x)
        loss.backward()
    flops = float(counter.get_total_flops())

    peak = MatmulPeak(torch.float32)
    peak_fp32 = max(peak.round()[0] for _ in range(3))
    bf16_peak = max(MatmulPeak(torch.bfloat16).round()[0] for _ in range(3))
    plan = [("fp32 eager", False, False), ("bf16 autocast eager", True, False)]
    if not args.no_compile:
        plan += [("fp32 compile", False, True), ("bf16 autocast compile", True, True)]
    rows: list[dict[str, float | str]] = []
    for name, bf16, compiled in plan:
        torch.manual_seed(0)
        fresh = MaskedAutoencoder(arch, mask_ratio=mask_ratio, norm_pix_loss=True).train()
        try:
            row = _variant(
                name, fresh, x, peak, bf16=bf16, compiled=compiled, flops=flops,
                warmup=args.warmup, reps=args.reps, rounds=args.rounds,
            )  # fmt: skip
        except Exception as err:  # e.g. no C++ toolchain for inductor: report, keep going
            row = {"variant": name, "error": f"{type(err).__name__}: {err}"[:300]}
        rows.append(row)
        torch._dynamo.reset()

    base_wall, base_cpu = float(rows[0]["step_s"]), float(rows[0]["step_cpu_s"])
    for row in rows:
        if "step_s" in row:
            row["speedup_vs_fp32_eager"] = base_wall / float(row["step_s"])
            row["speedup_vs_fp32_eager_cpu_time"] = base_cpu / float(row["step_cpu_s"])
    timed = [r for r in rows if "step_s" in r]
    fastest = min(timed, key=lambda r: float(r["step_cpu_s"]))["variant"]

    print(
        f"preset {args.preset}: img {arch.img_size} patch {arch.patch_size} dim {arch.embed_dim} "
        f"depth {arch.depth} | decoder {arch.decoder_embed_dim}x{arch.decoder_depth} | batch "
        f"{args.batch} mask {mask_ratio} threads {args.threads}"
    )
    print(f"fwd+bwd FLOPs per step: {flops / 1e9:.2f} GFLOP")
    print(f"best matmul 2048^3 at start: fp32 {peak_fp32:.1f} GFLOP/s, bf16 {bf16_peak:.1f}")
    _print_table(rows)
    print(f"fastest (by CPU time per step): {fastest}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {
            "preset": args.preset, "arch": arch.model_dump(), "batch": args.batch,
            "mask_ratio": mask_ratio, "threads": args.threads, "rounds": args.rounds,
            "reps": args.reps,
        },
        "machine": {"processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__},
        "flops_per_step": flops,
        "matmul_peak_gflops_at_start": {"fp32": peak_fp32, "bf16": bf16_peak},
        "variants": rows,
        "fastest": fastest,
    }  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
