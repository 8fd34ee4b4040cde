"""``retfm predict`` on a registered ONNX classifier: folders, files and manifests, unreadable
images reported (never dropped), CSV and parquet, the execution-provider choice, and the INT8
copy that serving may use instead."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from retfm.cli import app
from retfm.data.shards import load_image
from retfm.models.classifier import Classifier, probe_head
from retfm.models.encoder import Preprocessing, build_encoder
from retfm.models.onnx_export import export_onnx, onnx_parity, read_onnx_metadata
from retfm.models.quantize import quantize_onnx
from retfm.registry.inference import OnnxModel, providers
from retfm.registry.models import register_onnx
from retfm.settings import ModelPreset

ROOT = Path(__file__).resolve().parents[2]
ARCH = ModelPreset(
    img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
    decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2,
)  # fmt: skip
PREP = Preprocessing(img_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
CLASSES = ["healthy", "referable"]
NAME = "clf-test-fm-hospital"
MODEL = f"models:/{NAME}@candidate"


def _classifier() -> Classifier:
    torch.manual_seed(0)
    head = probe_head(ARCH.embed_dim, len(CLASSES))
    head[0].running_mean.uniform_(-0.5, 0.5)  # a trained-looking BatchNorm
    head[0].running_var.uniform_(0.5, 2.0)
    return Classifier.from_probe(build_encoder(ARCH), head, classes=CLASSES, prep=PREP)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, use_store) -> Path:  # noqa: ANN001
    """A registry holding one tiny real classifier (ONNX, probabilities), built once."""
    tmp = tmp_path_factory.mktemp("registry")
    with use_store(f"sqlite:///{tmp / 'mlflow.db'}") as client:
        exp = client.create_experiment("adapt", artifact_location=(tmp / "artifacts").as_uri())
        clf = _classifier()
        onnx_path = export_onnx(clf, PREP, tmp / "classifier.onnx", output_name="probabilities")
        weights = tmp / "classifier.safetensors"
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(weights))
        example = np.zeros((2, 3, 16, 16), dtype=np.float32)
        with torch.inference_mode():
            probs = clf(torch.from_numpy(example)).numpy()
        register_onnx(
            client,
            name=NAME,
            onnx_path=onnx_path,
            weights_path=weights,
            run_id=client.create_run(exp).info.run_id,
            parity=onnx_parity(clf, onnx_path),
            input_example=example,
            output_example=probs,
            metadata={
                "preprocessing": json.loads(PREP.to_json()),
                "classes": CLASSES,
                "output": "probabilities",
            },
            tags={"task": "test"},
            attachments={},
            description="tiny test classifier",
        )
    return tmp / "mlflow.db"


@pytest.fixture
def workdir(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """cwd with a params file; MLFLOW_TRACKING_URI points at the module's registry."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    mlflow.set_registry_uri(f"sqlite:///{store}")
    yield tmp_path
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def _images(folder: Path) -> dict[str, Path]:
    """Three good images (RGB 40x30, greyscale 16x16, RGBA 20x20) and two bad ones."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = {
        "a.png": Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)),
        "b.png": Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), mode="L"),
        "c.png": Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), mode="RGBA"),
    }
    for name, img in good.items():
        img.save(folder / name)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image\n")
    (folder / "readme.txt").write_text("not an image suffix: not an input\n")
    return {name: folder / name for name in [*good, "empty.png", "notes.png"]}


def _expected(path: Path) -> np.ndarray:
    """What the PyTorch classifier says about one image file: (K,) probabilities."""
    x = PREP.normalise(torch.from_numpy(load_image(path, PREP.img_size).copy())[None])
    with torch.inference_mode():
        return _classifier()(x)[0].numpy()


def _predict(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["predict", *args, "--params", "params.yaml"])
    return result.exit_code, result.stdout, result.stderr


def test_folder_good_images_predicted_bad_ones_reported(workdir: Path) -> None:
    files = _images(workdir / "images")
    code, out, err = _predict(str(workdir / "images"), "--model", MODEL, "--out", "p.csv")
    assert code == 0, out + err
    table = pd.read_csv(workdir / "p.csv")
    assert sorted(Path(p).name for p in table["path"]) == sorted(files)  # none dropped
    status = dict(zip(table["path"].map(lambda p: Path(p).name), table["status"], strict=True))
    assert {n: s for n, s in status.items() if s == "ok"}.keys() == {"a.png", "b.png", "c.png"}
    for bad in ("empty.png", "notes.png"):
        assert status[bad].startswith("unreadable: "), status[bad]
        assert bad in err  # and said on stderr
    assert "3 images predicted, 2 skipped" in out
    ok = table[table["status"] == "ok"]
    probs = ok[["prob_0", "prob_1"]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    for _, row in ok.iterrows():
        expected = _expected(Path(row["path"]))
        assert np.abs(row[["prob_0", "prob_1"]].to_numpy(float) - expected).max() < 1e-4
        assert row["predicted"] == CLASSES[int(np.argmax(expected))]


def test_manifest_and_files_to_parquet_keep_order_and_report_missing(workdir: Path) -> None:
    files = _images(workdir / "images")
    manifest = workdir / "manifest.csv"
    pd.DataFrame({"path": ["images/c.png", "images/gone.png", "images/a.png"]}).to_csv(manifest)
    code, out, err = _predict(
        str(manifest), str(files["b.png"]), str(files["empty.png"]),
        "--model", MODEL, "--out", "out/p.parquet", "--batch-size", "2",
    )  # fmt: skip
    assert code == 0, out + err
    table = pd.read_parquet(workdir / "out" / "p.parquet")
    assert [Path(p).name for p in table["path"]] == [
        "c.png",
        "gone.png",
        "a.png",
        "b.png",
        "empty.png",
    ]
    assert list(table["status"] == "ok") == [True, False, True, True, False]
    assert "gone.png" in table["status"][1] or "No such file" in table["status"][1]
    assert "gone.png" in err and "empty.png" in err


def test_nothing_readable_is_a_failure(workdir: Path) -> None:
    files = _images(workdir / "images")
    code, _, err = _predict(str(files["empty.png"]), "--model", MODEL, "--out", "p.csv")
    assert code == 1 and "no image could be predicted" in err


def test_unknown_model_is_a_clear_error(workdir: Path) -> None:
    files = _images(workdir / "images")
    code, _, err = _predict(str(files["a.png"]), "--model", "models:/nope@candidate")
    assert code == 1 and "predict:" in err and "nope" in err


def test_cuda_is_chosen_only_where_usable_and_cpu_is_the_fallback(workdir: Path) -> None:
    session = OnnxModel.load(MODEL).session
    assert providers()[-1] == "CPUExecutionProvider"
    if torch.cuda.is_available():
        assert session.get_providers()[0] == "CUDAExecutionProvider"
    else:  # onnxruntime-gpu may list CUDA here; it must not be asked for
        assert providers() == ["CPUExecutionProvider"]
        assert session.get_providers() == ["CPUExecutionProvider"]


def test_int8_copy_keeps_the_serving_contract_and_stays_close(tmp_path: Path) -> None:
    clf = _classifier()
    fp32 = export_onnx(clf, PREP, tmp_path / "clf.onnx", output_name="probabilities")
    int8 = quantize_onnx(fp32, tmp_path / "clf.int8.onnx")
    assert read_onnx_metadata(int8)["preprocessing"] == read_onnx_metadata(fp32)["preprocessing"]
    assert read_onnx_metadata(int8)["quantization"] == "int8-dynamic"
    graph = onnx.load(str(int8)).graph
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)
    x = np.random.default_rng(1).standard_normal((7, 3, 16, 16)).astype(np.float32)
    runs = {
        p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"image": x})
        for p in (fp32, int8)
    }
    assert runs[int8][0].shape == (7, 2)  # dynamic batch kept
    assert np.allclose(runs[int8][0].sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(runs[int8][0] - runs[fp32][0]).max() < 0.05


def test_predict_int8_option_runs_a_quantised_copy(workdir: Path) -> None:
    _images(workdir / "images")
    code, out, err = _predict(str(workdir / "images"), "--model", MODEL, "--int8", "--out", "q.csv")
    assert code == 0, out + err
    table = pd.read_csv(workdir / "q.csv")
    ok = table[table["status"] == "ok"]
    assert len(ok) == 3
    for _, row in ok.iterrows():
        diff = np.abs(row[["prob_0", "prob_1"]].to_numpy(float) - _expected(Path(row["path"])))
        assert diff.max() < 0.1  # close to fp32, but a different (quantised) model
