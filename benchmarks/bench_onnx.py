"""ONNX Runtime vs PyTorch eager on the CPU, and what INT8 dynamic quantisation buys and costs.

Serving runs the registered ONNX graph with ONNX Runtime; the obvious alternative is the same
model in PyTorch eager. Both get the same 2 threads, the same batch and the same inputs, in one
run, measured interleaved (torch, ORT, ORT-int8, torch, ...) so that the shared machine's noise
hits every runner alike. Cases: the FM encoder at the demo preset (``micro``) and the ``bench``
preset, and a classifier (micro encoder + linear-probe head). INT8 accuracy: a linear probe is
trained on synthetic fundus images (``retfm.data.synthetic``), and the test AUROC of the fp32
and INT8 ONNX classifiers is compared on the same images.

The encoders are randomly initialised (no pre-training here): speed does not depend on the
weights, and the probe still finds signal in random ViT features, enough to see whether
quantisation moves the AUROC.

    python benchmarks/bench_onnx.py            # writes benchmarks/results/bench_onnx.json
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from retfm.data.shards import load_image
from retfm.data.synthetic import generate_dataset
from retfm.models.classifier import Classifier, probe_head
from retfm.models.encoder import Preprocessing, build_encoder, encode
from retfm.models.onnx_export import export_onnx, onnx_parity
from retfm.models.quantize import quantize_onnx
from retfm.settings import ModelPreset, SyntheticSettings, SyntheticTask, load_settings

THREADS = 2
BATCH = 64
REPS = 15
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_onnx.json"

Runner = Callable[[np.ndarray], np.ndarray]


def torch_runner(module: torch.nn.Module) -> Runner:
    module = module.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return run


def ort_runner(path: Path) -> Runner:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return run


def measure(runners: dict[str, Runner], x: np.ndarray) -> dict[str, list[float]]:
    """Seconds per batch of each runner over REPS interleaved repetitions (after a warm-up)."""
    seconds: dict[str, list[float]] = {k: [] for k in runners}
    for run in runners.values():
        run(x)
    for _ in range(REPS):
        for key, run in runners.items():
            start = time.perf_counter()
            run(x)
            seconds[key].append(time.perf_counter() - start)
    return seconds


def speedup(seconds: dict[str, list[float]], fast: str, slow: str) -> float:
    """Median over repetitions of slow/fast time, each pair measured back to back, so that load
    from other processes on the shared machine mostly cancels."""
    pairs = zip(seconds[slow], seconds[fast], strict=True)
    return round(statistics.median(s / f for s, f in pairs), 2)


def speed_case(
    name: str, module: torch.nn.Module, onnx_path: Path, int8_path: Path, x: np.ndarray
) -> dict:
    runners = {
        "torch": torch_runner(module),
        "ort": ort_runner(onnx_path),
        "ort_int8": ort_runner(int8_path),
    }
    seconds = measure(runners, x)
    best = {k: len(x) / min(v) for k, v in seconds.items()}  # best of REPS: least disturbed
    return {
        "case": name,
        "torch_img_s": round(best["torch"], 1),
        "ort_img_s": round(best["ort"], 1),
        "ort_int8_img_s": round(best["ort_int8"], 1),
        "ort_vs_torch": speedup(seconds, "ort", "torch"),
        "int8_vs_torch": speedup(seconds, "ort_int8", "torch"),
        "int8_vs_ort": speedup(seconds, "ort_int8", "ort"),
        "torch_img_s_median": round(len(x) / statistics.median(seconds["torch"]), 1),
        "ort_img_s_median": round(len(x) / statistics.median(seconds["ort"]), 1),
        "parity_fp32": float(f"{onnx_parity(module, onnx_path):.3g}"),
        "onnx_mb": round(onnx_path.stat().st_size / 1e6, 2),
        "int8_mb": round(int8_path.stat().st_size / 1e6, 2),
    }


class _Features(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return encode(self.encoder, x)


def synthetic_task(arch: ModelPreset, tmp: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(N, S, S, 3) uint8 images, (N,) labels, metadata with splits; one small binary task."""
    cfg = SyntheticSettings(
        seed=7,
        image_size=arch.img_size,
        site_images=300,
        sites={"hospital": "specialist"},
        tasks={"bench_dr": SyntheticTask(source_site="hospital", images=900, classes=2)},
    )
    generate_dataset(cfg, [], tmp / "data", progress=False)
    root = tmp / "data" / "tasks" / "bench_dr"
    meta = pd.read_csv(root / "metadata.csv")
    images = np.stack([load_image(root / p, arch.img_size) for p in meta["path"]])
    return images, meta["label"].to_numpy(int), meta


def train_probe(encoder: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    """The linear probe (BatchNorm + Linear) on frozen features, full-batch AdamW."""
    with torch.inference_mode():
        feats = encode(encoder, torch.from_numpy(x)).clone()
    head = probe_head(feats.shape[1], 2)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.01)
    target = torch.from_numpy(y)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), target).backward()
        opt.step()
    return head.eval()


def normalise(images: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 per the preprocessing contract."""
    return prep.normalise(torch.from_numpy(images)).numpy()


def int8_quality(probs: dict[str, np.ndarray], y: np.ndarray, n_train: int) -> dict:
    """Test AUROC of torch / fp32 ONNX / INT8 ONNX on the same images, and how far INT8 moves."""
    auroc = {k: float(roc_auc_score(y, p[:, 1])) for k, p in probs.items()}
    fp32, int8 = probs["ort_fp32"], probs["ort_int8"]
    return {
        "task": "synthetic bench_dr (hospital archetype), binary",
        "n_train": n_train,
        "n_test": len(y),
        "positives_test": int(y.sum()),
        "auroc": {k: round(v, 4) for k, v in auroc.items()},
        "auroc_change_int8": round(auroc["ort_int8"] - auroc["ort_fp32"], 4),
        "max_abs_prob_diff_int8": float(f"{np.abs(int8 - fp32).max():.3g}"),
        "max_abs_prob_diff_fp32_vs_torch": float(f"{np.abs(fp32 - probs['torch']).max():.3g}"),
        "argmax_agreement_int8": round(float((int8.argmax(1) == fp32.argmax(1)).mean()), 4),
    }


def print_table(rows: list[dict], quality: dict) -> None:
    print(
        f"\nCPU, {THREADS} threads each, batch {BATCH}: images/s best of {REPS}; "
        "ratios: median of back-to-back pairs"
    )
    print(
        f"{'case':<18}{'torch':>9}{'ORT':>9}{'ORT int8':>10}"
        f"{'ORT/torch':>11}{'int8/torch':>12}{'int8/ORT':>10}"
    )
    for r in rows:
        print(
            f"{r['case']:<18}{r['torch_img_s']:>9}{r['ort_img_s']:>9}{r['ort_int8_img_s']:>10}"
            f"{r['ort_vs_torch']:>10}x{r['int8_vs_torch']:>11}x{r['int8_vs_ort']:>9}x"
        )
    print(
        f"\nINT8 on {quality['task']}: test AUROC {quality['auroc']}, "
        f"change {quality['auroc_change_int8']:+.4f}"
    )


def main() -> None:
    torch.set_num_threads(THREADS)
    settings = load_settings(ROOT / "params.yaml")
    presets = settings.model.presets
    rows, quality = [], {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for preset in ("micro", "bench"):
            arch = presets[preset]
            prep = Preprocessing(arch.img_size)
            torch.manual_seed(0)
            encoder = build_encoder(arch).eval()
            onnx_path = export_onnx(encoder, prep, tmp / f"{preset}.onnx")
            int8_path = quantize_onnx(onnx_path, tmp / f"{preset}.int8.onnx")
            x = np.random.default_rng(0).standard_normal((BATCH, 3, arch.img_size, arch.img_size))
            x = x.astype(np.float32)
            rows.append(
                speed_case(f"encoder {preset}", _Features(encoder), onnx_path, int8_path, x)
            )
            print(rows[-1], flush=True)

        arch = presets["micro"]
        prep = Preprocessing(arch.img_size)
        torch.manual_seed(0)
        encoder = build_encoder(arch).eval()
        images, labels, meta = synthetic_task(arch, tmp)
        x_all = normalise(images, prep)
        train = (meta["split"] != "test").to_numpy()
        test = ~train
        head = train_probe(encoder, x_all[train], labels[train])
        clf = Classifier.from_probe(encoder, head, classes=["0", "1"], prep=prep)
        clf_path = export_onnx(clf, prep, tmp / "clf.onnx", output_name="probabilities")
        clf_int8 = quantize_onnx(clf_path, tmp / "clf.int8.onnx")
        x_test = x_all[test]
        batch = (
            x_test[:BATCH]
            if len(x_test) >= BATCH
            else np.resize(x_test, (BATCH, *x_test.shape[1:]))
        )
        rows.append(
            speed_case("classifier micro", clf, clf_path, clf_int8, np.ascontiguousarray(batch))
        )
        print(rows[-1], flush=True)

        probs = {
            "torch": torch_runner(clf)(x_test),
            "ort_fp32": ort_runner(clf_path)(x_test),
            "ort_int8": ort_runner(clf_int8)(x_test),
        }
        quality = int8_quality(probs, labels[test], int(train.sum()))

    print_table(rows, quality)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "threads": THREADS,
        "batch": BATCH,
        "reps": REPS,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "ort_graph_optimization": "ORT_ENABLE_ALL",
        "speed": rows,
        "int8_quality": quality,
    }
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"-> {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
