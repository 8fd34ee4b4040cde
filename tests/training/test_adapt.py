"""adapt(): MAE's linear probe, RETFound's lp and fine-tuning on a tiny encoder and a task whose
label is visible (image brightness), so a working adaptation must clearly beat chance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from retfm.data.images import ArrayImages
from retfm.models.encoder import Preprocessing, build_encoder, load_encoder, save_encoder
from retfm.settings import AdaptSettings, ModelPreset
from retfm.training.adapt import adapt, macro_auroc, task_classes
from retfm.training.features import extract_features

ARCH = ModelPreset(
    img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
)  # fmt: skip
PROBE = AdaptSettings(
    method="mae_linprobe", selection="auroc", epochs=30, batch_size=16, warmup_epochs=3
)
FINETUNE = AdaptSettings(method="finetune", epochs=4, batch_size=16, warmup_epochs=1)
LP = AdaptSettings(method="retfound_lp", epochs=6, batch_size=16, warmup_epochs=1, base_lr=0.5)


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fm") / "encoder.safetensors"
    return save_encoder(path, build_encoder(ARCH), ARCH, Preprocessing(img_size=ARCH.img_size))


def make_task(
    n: int = 120, k: int = 2, seed: int = 0, metadata: bool = True
) -> tuple[ArrayImages, pd.DataFrame]:
    """Class k is a brightness level plus pixel noise; splits ~60/20/20, every class in each."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    rng.shuffle(y)
    level = 70 + 110 * y / (k - 1)
    noise = rng.normal(0, 25, (n, ARCH.img_size, ARCH.img_size, 3))
    images = np.clip(level[:, None, None, None] + noise, 0, 255).astype(np.uint8)
    split = np.array(["train", "train", "train", "val", "test"])[np.arange(n) % 5]
    meta = pd.DataFrame(
        {
            "image_id": [f"img{i:03d}" for i in range(n)],
            "patient_id": [f"pat{i // 2:03d}" for i in range(n)],
            "label": [f"grade{v}" for v in y],
            "split": split,
        }
    )
    if metadata:
        meta["age"] = rng.uniform(20, 85, n).round(1)
        meta["sex"] = rng.choice(["F", "M"], n)
        meta["ethnicity"] = rng.choice(["asian", "white", "black"], n)
    return ArrayImages(images), meta


def probs_of(result, k: int) -> np.ndarray:  # noqa: ANN001
    return result.predictions[[f"prob_{i}" for i in range(k)]].to_numpy()


def test_linear_probe_beats_chance_on_test(encoder_path: Path) -> None:
    images, meta = make_task()
    result = adapt(encoder_path, images, meta, PROBE, seed=0, progress=False)
    pred = result.predictions
    assert result.classes == ["grade0", "grade1"]
    assert len(pred) == int((meta["split"] == "test").sum())
    assert roc_auc_score(pred["y_true"], pred["prob_1"]) > 0.8


def test_multiclass_probabilities(encoder_path: Path) -> None:
    images, meta = make_task(n=120, k=3)
    result = adapt(encoder_path, images, meta, PROBE, seed=0, progress=False)
    probs = probs_of(result, 3)
    assert probs.shape == (24, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert roc_auc_score(result.predictions["y_true"], probs, multi_class="ovr") > 0.8


def test_predictions_carry_metadata_and_keys(encoder_path: Path) -> None:
    images, meta = make_task()
    pred = adapt(encoder_path, images, meta, PROBE, seed=0, progress=False).predictions
    expected = ["image_id", "patient_id", "y_true", "prob_0", "prob_1", "age", "sex", "ethnicity"]
    assert list(pred.columns) == expected
    test = meta[meta["split"] == "test"].reset_index(drop=True)
    pd.testing.assert_series_equal(pred["image_id"], test["image_id"])
    pd.testing.assert_series_equal(pred["age"], test["age"])
    assert (pred["y_true"] == test["label"].str[-1].astype(int)).all()

    images, bare = make_task(metadata=False)
    pred = adapt(encoder_path, images, bare, PROBE, seed=0, progress=False).predictions
    assert not {"age", "sex", "ethnicity"} & set(pred.columns)


def test_same_seed_same_result_other_seed_differs(encoder_path: Path) -> None:
    images, meta = make_task()
    a = adapt(encoder_path, images, meta, PROBE, seed=3, progress=False)
    b = adapt(encoder_path, images, meta, PROBE, seed=3, progress=False)
    c = adapt(encoder_path, images, meta, PROBE, seed=4, progress=False)
    pd.testing.assert_frame_equal(a.predictions, b.predictions)
    assert a.val_scores == b.val_scores
    diff = np.abs(probs_of(a, 2) - probs_of(c, 2)).max()
    assert 0 < diff < 0.5  # a different seed moves the result, but only slightly
    y = a.predictions["y_true"]
    assert (
        abs(roc_auc_score(y, probs_of(a, 2)[:, 1]) - roc_auc_score(y, probs_of(c, 2)[:, 1])) < 0.1
    )


def test_precomputed_features_give_the_same_probe(encoder_path: Path) -> None:
    images, meta = make_task()
    encoder, _, prep, _ = load_encoder(encoder_path)
    features = extract_features(encoder, prep, images, batch_size=32, progress=False)
    a = adapt(encoder_path, images, meta, PROBE, seed=1, features=features, progress=False)
    b = adapt(encoder_path, images, meta, PROBE, seed=1, progress=False)
    np.testing.assert_allclose(probs_of(a, 2), probs_of(b, 2), atol=1e-6)


def test_probe_keeps_selected_epoch_and_classifier_reproduces_predictions(
    encoder_path: Path,
) -> None:
    images, meta = make_task(k=3)
    result = adapt(encoder_path, images, meta, PROBE, seed=0, progress=False)
    assert len(result.val_scores) == len(result.history) == PROBE.epochs
    assert result.best_val_auroc == max(result.val_scores)
    assert result.val_scores[result.best_epoch] == result.best_val_auroc

    classifier = result.classifier
    assert not classifier.training
    _, _, prep, _ = load_encoder(encoder_path)
    split = meta["split"].to_numpy()
    with torch.inference_mode():
        x = prep.normalise(torch.from_numpy(images.array))
        probs = classifier(x).double().numpy()
    np.testing.assert_allclose(probs[split == "test"], probs_of(result, 3), atol=1e-5)
    y = np.array([result.classes.index(v) for v in meta["label"]])
    assert macro_auroc(y[split == "val"], probs[split == "val"]) == pytest.approx(
        result.best_val_auroc, abs=1e-6
    )


def test_probe_lr_warms_up_then_decays_to_min(encoder_path: Path) -> None:
    images, meta = make_task()
    history = adapt(encoder_path, images, meta, PROBE, seed=0, progress=False).history
    lrs = [h["lr"] for h in history]
    peak = PROBE.probe_base_lr * PROBE.batch_size / 256
    assert lrs[0] < lrs[1] < lrs[2] <= peak * (1 + 1e-9)
    assert lrs[-1] == pytest.approx(PROBE.min_lr, rel=1e-6)
    assert all(b <= a for a, b in zip(lrs[3:], lrs[4:], strict=False))


def test_finetune_runs_and_selects_best_epoch(encoder_path: Path) -> None:
    images, meta = make_task()
    result = adapt(encoder_path, images, meta, FINETUNE, seed=0, progress=False)
    assert result.method == "finetune"
    assert len(result.val_scores) == FINETUNE.epochs
    assert result.val_scores[result.best_epoch] == max(result.val_scores)
    pred = result.predictions
    assert roc_auc_score(pred["y_true"], pred["prob_1"]) > 0.8

    classifier = result.classifier
    _, _, prep, _ = load_encoder(encoder_path)
    test = meta["split"].to_numpy() == "test"
    with torch.inference_mode():
        probs = classifier(prep.normalise(torch.from_numpy(images.array[test]))).numpy()
    np.testing.assert_allclose(probs, probs_of(result, 2), atol=1e-5)
    # the encoder was trained, not frozen: its weights left the pre-trained ones
    pretrained, _, _, _ = load_encoder(encoder_path)
    moved = classifier.encoder.blocks[0].attn.qkv.weight - pretrained.blocks[0].attn.qkv.weight
    assert moved.abs().max() > 0


def test_retfound_lp_trains_the_head_only_and_beats_chance(encoder_path: Path) -> None:
    images, meta = make_task()
    result = adapt(encoder_path, images, meta, LP, seed=0, progress=False)
    pred = result.predictions
    assert roc_auc_score(pred["y_true"], pred["prob_1"]) > 0.8
    pretrained, _, _, _ = load_encoder(encoder_path)
    enc = result.classifier.encoder.state_dict()
    assert all(torch.equal(enc[k], v) for k, v in pretrained.state_dict().items())
    assert isinstance(result.classifier.head, torch.nn.Linear)  # RETFound's plain head
    # selected on RETFound's score: the earliest epoch with the highest one
    scores = [h["val_score"] for h in result.history]
    assert result.best_epoch == scores.index(max(scores))


def test_finetune_is_deterministic(encoder_path: Path) -> None:
    images, meta = make_task(n=60)
    cfg = FINETUNE.model_copy(update={"epochs": 2})
    a = adapt(encoder_path, images, meta, cfg, seed=5, progress=False)
    b = adapt(encoder_path, images, meta, cfg, seed=5, progress=False)
    pd.testing.assert_frame_equal(a.predictions, b.predictions)


def test_caller_rng_is_untouched(encoder_path: Path) -> None:
    images, meta = make_task(n=60)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    adapt(encoder_path, images, meta, PROBE, seed=0, progress=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.drop(columns="split"), r"lacks column\(s\) \['split'\]"),
        (lambda m: m.assign(split=m["split"].replace("val", "train")), r"no rows .*\['val'\]"),
        (lambda m: m.assign(split=m["split"].replace("val", "valid")), r"'valid' at row"),
        (lambda m: m.assign(label="grade0"), "one class only"),
        (
            lambda m: m.assign(label=m["label"].where(m["split"] != "train", "grade0")),
            r"\['grade1'\] never occur in split 'train'",
        ),
        (
            lambda m: m.assign(label=m["label"].where(m["split"] != "val", "grade0")),
            "split 'val' holds a single label",
        ),
        (lambda m: m.iloc[:-1], "must be aligned by position"),
        (
            lambda m: m.assign(label=m["label"].mask(m.index == 7)),
            r"'label' is empty at row\(s\) \[7\]",
        ),
    ],
)
def test_bad_task_raises(encoder_path: Path, mutate, message: str) -> None:  # noqa: ANN001
    images, meta = make_task(n=60)
    with pytest.raises(ValueError, match=message):
        adapt(encoder_path, images, mutate(meta), PROBE, seed=0, progress=False)


def test_missing_encoder_file_raises(tmp_path: Path) -> None:
    images, meta = make_task(n=60)
    with pytest.raises(FileNotFoundError, match="absent.safetensors: no such encoder file"):
        adapt(tmp_path / "absent.safetensors", images, meta, PROBE, seed=0, progress=False)


def test_feature_rows_must_match(encoder_path: Path) -> None:
    images, meta = make_task(n=60)
    with pytest.raises(ValueError, match="features have 59 rows but the task has 60"):
        adapt(encoder_path, images, meta, PROBE, seed=0, features=np.zeros((59, 32), np.float32))


def test_classes_sort_numerically_when_numeric() -> None:
    assert task_classes(pd.Series(["10", "2", "1", "2"])) == ["1", "2", "10"]
    assert task_classes(pd.Series([3, 0, 1])) == ["0", "1", "3"]
    assert task_classes(pd.Series(["mild", "DR", "none"])) == ["DR", "mild", "none"]


def test_macro_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    palette = np.array([[0.2, 0.3, 0.5], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
    probs = palette[rng.integers(0, len(palette), 200)]  # few distinct scores: many ties
    assert macro_auroc(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    y2 = rng.integers(0, 2, 200)
    p2 = np.stack([1 - probs[:, 0], probs[:, 0]], axis=1)
    assert macro_auroc(y2, p2) == pytest.approx(roc_auc_score(y2, p2[:, 1]))
    assert np.isnan(macro_auroc(np.zeros(5, int), np.full((5, 2), 0.5)))
