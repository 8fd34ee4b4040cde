"""Gated promotion: every gate on plain dicts, then ``promote`` / ``rollback`` (library and CLI)
on a real sqlite registry holding real ONNX versions, the audit trail of a refusal, and
concurrent promotions serialised by the file lock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from filelock import FileLock
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from retfm.cli import app
from retfm.models.encoder import Preprocessing, build_encoder, encode, save_encoder
from retfm.models.onnx_export import export_onnx, onnx_parity
from retfm.registry.evaluation import settings_digest
from retfm.registry.models import CHAMPION, register_onnx
from retfm.registry.promotion import evaluate_gates, lock_path, promote, rollback
from retfm.settings import ModelPreset, load_settings

ROOT = Path(__file__).resolve().parents[2]
RETFM = str(Path(sys.executable).parent / "retfm")
ARCH = ModelPreset(
    img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
    decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2,
)  # fmt: skip
PREP = Preprocessing(img_size=16)
CFG = load_settings(ROOT / "params.yaml").promotion  # the CLI tests read the same file
STUDY_SETTINGS = settings_digest(CFG.model_dump(mode="json"))
FACTORS = ["age", "age_fine", "sex", "ethnicity"]  # what params.yaml's evaluation judges
LINEAGE = {
    "data.md5": "d" * 32,
    "cohort.md5": "c" * 32,
    "git.commit": "a" * 40,
    "params.hash": "p" * 16,
    "recipe": "mae-test",
    "recipe.hash": "r" * 16,
    "fm.site": "hospital",
    "weights.sha256": "w" * 64,
}
NAME = "fm-hospital"


def evaluation(auroc: float, *, data: str = "eval-1", **per_factor: str) -> dict[str, str]:
    """``eval.*`` tags as the compare stage writes them; ``per_factor`` overrides one key."""
    tags = {"eval.data": data, "eval/auroc": f"{auroc}", "eval.promotion_settings": STUDY_SETTINGS}
    for f in FACTORS:
        tags[f"eval/worst/auroc/{f}"] = "0.7"
        tags[f"eval/gap/auroc/{f}"] = "0.1"
        tags[f"eval/n_undefined/{f}"] = "0"
    tags.update({k.replace("__", "/").replace("/undefined_groups/", ".undefined_groups."): v
                 for k, v in per_factor.items()})  # fmt: skip
    return tags


def failed(gates: list) -> set[str]:
    return {g.name for g in gates if not g.passed}


# ---------------------------------------------------------------- gates on plain dicts


def test_all_gates_pass_and_each_is_reported_with_values() -> None:
    gates = evaluate_gates(CFG, {**LINEAGE, **evaluation(0.8)}, None, FACTORS)
    assert failed(gates) == set()
    names = {g.name for g in gates}
    assert {"lineage complete", "auroc floor"} <= names
    for f in FACTORS:
        assert {f"worst {f} group auroc", f"{f} gap", f"{f} groups judgeable"} <= names
    assert "[PASS] auroc floor: 0.8000 (required >= 0.6)" in [g.line().strip() for g in gates]


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        ({"eval/auroc": "0.59"}, {"auroc floor"}),
        ({"eval/auroc": None}, {"auroc floor"}),
        ({"eval/worst/auroc/sex": "0.49"}, {"worst sex group auroc"}),
        ({"eval/gap/auroc/ethnicity": "0.26"}, {"ethnicity gap"}),
        ({"eval/n_undefined/age_fine": "2"}, {"age_fine groups judgeable"}),
        ({"eval/n_undefined/sex": None}, {"sex groups judgeable"}),  # never assumed zero
        ({"eval/n_undefined/sex": "nan"}, {"sex groups judgeable"}),
        ({"eval/worst/auroc/age": None}, {"worst age group auroc"}),
        ({"eval/gap/auroc/age": None}, {"age gap"}),
        ({"git.commit": None}, {"lineage complete"}),
        ({"data.md5": "untracked", "cohort.md5": "unlocked"}, {"lineage complete"}),
    ],
)  # fmt: skip
def test_one_bad_value_fails_exactly_its_gate(
    candidate: dict[str, str | None], expected: set[str]
) -> None:
    tags = {**LINEAGE, **evaluation(0.8)}
    for key, value in candidate.items():
        if value is None:
            tags.pop(key)
        else:
            tags[key] = value
    gates = evaluate_gates(CFG, tags, None, FACTORS)
    assert failed(gates) == expected
    if "lineage complete" in expected:
        lineage = next(g for g in gates if g.name == "lineage complete")
        assert all(k in lineage.value for k in candidate)


def test_other_promotion_settings_are_refused_or_recorded_loudly() -> None:
    looser = CFG.model_copy(update={"max_gap": 0.9})
    good = {**LINEAGE, **evaluation(0.8)}
    gates = evaluate_gates(looser, good, None, FACTORS)
    assert failed(gates) == {"promotion settings are the study's"}
    gate = next(g for g in gates if g.name == "promotion settings are the study's")
    assert gate.value.startswith("OTHER settings") and STUDY_SETTINGS in gate.value
    allowed = evaluate_gates(looser, good, None, FACTORS, allow_other_settings=True)
    assert not failed(allowed)
    assert any(g.value.startswith("OTHER settings") for g in allowed)  # passed, and said so
    unstamped = {k: v for k, v in good.items() if k != "eval.promotion_settings"}
    assert "promotion settings are the study's" in failed(
        evaluate_gates(CFG, unstamped, None, FACTORS)
    )


@pytest.mark.parametrize(
    ("mode", "small", "passes"),
    [("refuse", "2", False), ("exclude_small", "2", True), ("exclude_small", "1", False),
     ("exclude", "0", True)],
)  # fmt: skip
def test_undefined_groups_are_judged_as_the_settings_say_and_named(
    mode: str, small: str, passes: bool
) -> None:
    cfg = CFG.model_copy(update={"undefined_groups": mode})
    names = "screening_dr: black (4 images), other (12 images: single class)"
    tags = evaluation(0.8, eval__n_undefined__ethnicity="2",
                      eval__n_undefined_small__ethnicity=small,
                      eval__undefined_groups__ethnicity=names)  # fmt: skip
    tags["eval.promotion_settings"] = settings_digest(cfg.model_dump(mode="json"))
    gates = evaluate_gates(cfg, tags, None, FACTORS)
    gate = next(g for g in gates if g.name == "ethnicity groups judgeable")
    assert gate.passed is passes
    assert "screening_dr: black (4 images)" in gate.value  # which groups, on which task


def test_drop_versus_champion_on_the_same_evaluation_data() -> None:
    champion = {**LINEAGE, **evaluation(0.83)}
    small_drop = evaluate_gates(CFG, {**LINEAGE, **evaluation(0.815)}, champion, FACTORS)
    big_drop = evaluate_gates(CFG, {**LINEAGE, **evaluation(0.80)}, champion, FACTORS)
    assert failed(small_drop) == set()
    assert failed(big_drop) == {"auroc vs champion"}
    line = next(g.line() for g in big_drop if g.name == "auroc vs champion")
    assert "FAIL" in line and "0.8" in line and "0.83" in line


def test_different_evaluation_data_is_never_compared() -> None:
    champion = {**LINEAGE, **evaluation(0.70, data="eval-1")}
    better_elsewhere = {**LINEAGE, **evaluation(0.95, data="eval-2")}
    gates = evaluate_gates(CFG, better_elsewhere, champion, FACTORS)
    assert failed(gates) == {"auroc vs champion"}
    assert "evaluation data differ" in next(g.value for g in gates if g.name == "auroc vs champion")
    no_data = {k: v for k, v in better_elsewhere.items() if k != "eval.data"}
    champion_no_data = {k: v for k, v in champion.items() if k != "eval.data"}
    assert failed(evaluate_gates(CFG, no_data, champion_no_data, FACTORS)) == {"auroc vs champion"}


# ---------------------------------------------------------------- the real registry


def _register(client: MlflowClient, tmp: Path, seed: int, run_id: str) -> str:
    torch.manual_seed(seed)
    encoder = build_encoder(ARCH).eval()
    weights = save_encoder(tmp / f"v{seed}" / "encoder.safetensors", encoder, ARCH, PREP)
    onnx_path = export_onnx(encoder, PREP, tmp / f"v{seed}" / "encoder.onnx")
    example = np.zeros((1, 3, 16, 16), dtype=np.float32)
    with torch.inference_mode():
        features = encode(encoder, torch.from_numpy(example)).numpy()
    reg = register_onnx(
        client,
        name=NAME,
        onnx_path=onnx_path,
        weights_path=weights,
        run_id=run_id,
        parity=onnx_parity(encoder, onnx_path),
        input_example=example,
        output_example=features,
        metadata={"preprocessing": json.loads(PREP.to_json())},
        tags={k: v for k, v in LINEAGE.items() if k != "weights.sha256"},
        attachments={},
        description="test",
    )
    return reg.version


@pytest.fixture(scope="module")
def populated_db(tmp_path_factory: pytest.TempPathFactory, use_store) -> Path:  # noqa: ANN001
    """A registry with versions 1, 2, 3 of ``fm-hospital`` (real ONNX), built once and copied."""
    tmp = tmp_path_factory.mktemp("registry")
    with use_store(f"sqlite:///{tmp / 'mlflow.db'}") as client:
        exp = client.create_experiment("pretrain", artifact_location=(tmp / "artifacts").as_uri())
        versions = [
            _register(client, tmp, s, client.create_run(exp).info.run_id) for s in (1, 2, 3)
        ]
        assert versions == ["1", "2", "3"]
    return tmp / "mlflow.db"


@pytest.fixture
def registry(
    tmp_path: Path, populated_db: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[MlflowClient, Path]]:
    """A private copy of the populated registry and a params file; cwd is ``tmp_path``."""
    shutil.copy(populated_db, tmp_path / "mlflow.db")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield MlflowClient(uri, uri), tmp_path
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def _tag(client: MlflowClient, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(NAME, version, key, value)


def _champion(client: MlflowClient) -> str | None:
    try:
        return str(client.get_model_version_by_alias(NAME, CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return None


def _decisions(client: MlflowClient) -> list[dict]:
    """Every recorded decision (promotion.json of each run in ``promotion``), oldest first."""
    exp = client.get_experiment_by_name("promotion")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    out = []
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run.info.run_id, "promotion.json", tmp)
            out.append(json.loads(Path(path).read_text()))
    return sorted(out, key=lambda d: d["when"])


def _exp(client: MlflowClient, tmp: Path) -> str:
    exp = client.get_experiment_by_name("promotion")
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment("promotion", artifact_location=(tmp / "promo").as_uri())


def test_promote_moves_champion_and_records_history(registry) -> None:
    client, tmp = registry
    _tag(client, "1", evaluation(0.80))
    _tag(client, "2", evaluation(0.81))
    exp = _exp(client, tmp)
    first = promote(client, NAME, "1", CFG, FACTORS, exp)
    assert first.promoted and first.previous_champion is None and _champion(client) == "1"
    second = promote(client, NAME, None, CFG, FACTORS, exp)  # None: @candidate, i.e. v3
    assert not second.promoted and second.version == "3"  # v3 was never evaluated
    third = promote(client, NAME, "2", CFG, FACTORS, exp)
    assert third.promoted and third.previous_champion == "1" and _champion(client) == "2"
    last = json.loads(client.get_model_version(NAME, "2").tags["promotion.last"])
    assert last["promoted"] and last["previous_champion"] == "1" and last["who"]
    assert [d["version"] for d in _decisions(client)] == ["1", "3", "2"]
    again = promote(client, NAME, "2", CFG, FACTORS, exp)  # the champion, promoted again
    assert again.promoted and again.previous_champion == "1"  # not itself
    runs = client.search_runs([exp], order_by=["attributes.start_time ASC"])
    names = {r.info.run_name for r in runs}
    assert {"promote-fm-hospital-v3-refused", "promote-fm-hospital-v2-granted"} <= names, names


def test_refusal_exits_nonzero_changes_nothing_and_is_recorded(registry) -> None:
    client, tmp = registry
    _tag(client, "1", evaluation(0.80))
    _tag(client, "2", evaluation(0.75, eval__n_undefined__ethnicity="1"))
    runner = CliRunner()
    ok = runner.invoke(app, ["promote", NAME, "--version", "1", "--params", "params.yaml"])
    assert ok.exit_code == 0, ok.output
    assert "PROMOTED" in ok.output and _champion(client) == "1"
    aliases_before = client.get_registered_model(NAME).aliases
    history_before = client.get_registered_model(NAME).tags.get("champion.history")

    refused = runner.invoke(app, ["promote", NAME, "--version", "2", "--params", "params.yaml"])
    assert refused.exit_code == 1
    out = refused.output
    assert "REFUSED" in out and "(champion was: 1)" in out
    assert "[FAIL] auroc vs champion: 0.75 vs champion 0.8" in out
    assert "[FAIL] ethnicity groups judgeable: 1 undefined (0 only under 10 images)" in out
    assert "[PASS] auroc floor: 0.7500 (required >= 0.6)" in out
    assert "[PASS] lineage complete" in out
    model = client.get_registered_model(NAME)
    assert model.aliases == aliases_before and model.tags.get("champion.history") == history_before
    last = json.loads(client.get_model_version(NAME, "2").tags["promotion.last"])
    assert last["promoted"] is False and last["previous_champion"] == "1"
    assert {g["name"] for g in last["gates"] if not g["passed"]} == {
        "auroc vs champion",
        "ethnicity groups judgeable",
    }
    exp = client.get_experiment_by_name("promotion")
    refusals = client.search_runs([exp.experiment_id], "tags.promoted = 'false'")
    assert [r.data.tags["model.version"] for r in refusals] == ["2"]


def test_rollback_returns_to_the_previous_champion_then_has_nothing_left(registry) -> None:
    client, tmp = registry
    for v, auroc in (("1", 0.80), ("2", 0.82), ("3", 0.84)):
        _tag(client, v, evaluation(auroc))
    exp = _exp(client, tmp)
    for v in ("1", "2", "3"):
        assert promote(client, NAME, v, CFG, FACTORS, exp).promoted
    back = rollback(client, NAME, exp)
    assert back.version == "2" and back.previous_champion == "3" and _champion(client) == "2"
    runner = CliRunner()
    cli = runner.invoke(app, ["rollback", NAME, "--params", "params.yaml"])
    assert cli.exit_code == 0, cli.output
    assert _champion(client) == "1"
    first = runner.invoke(app, ["rollback", NAME, "--params", "params.yaml"])
    assert first.exit_code == 0  # back to before the first promotion
    assert "ROLLED BACK: fm-hospital @champion from version 1 to no champion" in first.output
    assert _champion(client) is None
    empty = runner.invoke(app, ["rollback", NAME, "--params", "params.yaml"])
    assert empty.exit_code == 1 and "no promotion to roll back" in empty.output
    assert _champion(client) is None
    names = {r.info.run_name for r in client.search_runs([exp])}
    assert {"promote-fm-hospital-vnone-rollback", "promote-fm-hospital-v2-rollback"} <= names


def test_clear_errors_for_unknown_model_and_no_history(registry) -> None:
    client, _ = registry
    runner = CliRunner()
    fresh = runner.invoke(app, ["rollback", NAME, "--params", "params.yaml"])
    assert fresh.exit_code == 1 and "no promotion to roll back" in fresh.output
    unknown = runner.invoke(app, ["promote", "fm-nowhere", "--params", "params.yaml"])
    assert unknown.exit_code == 1 and "fm-nowhere: no @candidate" in unknown.output
    missing = runner.invoke(app, ["promote", NAME, "--version", "9", "--params", "params.yaml"])
    assert missing.exit_code == 1 and "no version 9" in missing.output
    assert _champion(client) is None


def _env(uri: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri}


@pytest.mark.e2e  # starts retfm processes (several seconds each)
def test_the_lock_is_per_store_and_really_taken(registry) -> None:
    client, tmp = registry
    uri = client.tracking_uri
    relative = "sqlite:///" + os.path.relpath(tmp / "mlflow.db")
    assert lock_path(relative) == lock_path(uri)  # one store, one lock, however it is spelt
    assert lock_path(uri) != lock_path(f"sqlite:///{tmp / 'other.db'}")
    _tag(client, "1", evaluation(0.80))
    code = (
        "import sys; from retfm.registry import promotion; promotion.LOCK_TIMEOUT_S = 1; "
        "from retfm.cli import app; app(sys.argv[1:])"
    )
    args = ["promote", NAME, "--version", "1", "--params", "params.yaml"]
    with FileLock(str(lock_path(uri))):  # a promotion in progress elsewhere
        blocked = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=tmp, env=_env(uri), capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
    assert blocked.returncode == 1 and "promote" in blocked.stderr and "lock" in blocked.stderr
    assert _champion(client) is None
    assert "promotion.last" not in client.get_model_version(NAME, "1").tags


# `retfm promote`, with a hook that says when it reaches the lock and a 1 s pause between
# reading the champion and moving it: without the lock, two promotions would both judge
# against the old champion, and the test below would see it.
RACER = """
import sys, time
from retfm.registry import promotion as p
gates, lock = p.evaluate_gates, p._lock_for
p.evaluate_gates = lambda *a, **k: (time.sleep(1.0), gates(*a, **k))[1]
p._lock_for = lambda client: (print("at-lock", flush=True), lock(client))[1]
from retfm.cli import app
app(sys.argv[1:])
"""


@pytest.mark.e2e  # starts retfm processes (several seconds each)
def test_concurrent_promotions_leave_champion_on_a_version_that_passed(registry) -> None:
    """v2 beats v1 and v3; v3 beats v1 but not v2. Both start at the same moment; whichever
    wins, the champion must end on v2 and each move must have been judged against the champion
    it replaced."""
    client, tmp = registry
    _tag(client, "1", evaluation(0.80))
    _tag(client, "2", evaluation(0.85))
    _tag(client, "3", evaluation(0.82))
    assert promote(client, NAME, "1", CFG, FACTORS, _exp(client, tmp)).promoted
    uri = client.tracking_uri
    with FileLock(str(lock_path(uri))):  # hold both at the gate, then release them together
        procs = {
            v: subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    RACER,
                    "promote",
                    NAME,
                    "--version",
                    v,
                    "--params",
                    "params.yaml",
                ],
                cwd=tmp,
                env=_env(uri),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for v in ("2", "3")
        }
        for proc in procs.values():
            assert proc.stdout.readline().strip() == "at-lock", proc.stderr.read()
    codes = {v: p.wait(timeout=300) for v, p in procs.items()}
    assert codes["2"] == 0, procs["2"].stdout.read() + procs["2"].stderr.read()
    assert _champion(client) == "2"
    champion = None
    for decision in _decisions(client):
        assert decision["previous_champion"] == champion, decision  # judged vs the live champion
        if decision["promoted"]:
            champion = decision["version"]
    assert champion == "2"
    history = json.loads(client.get_registered_model(NAME).tags["champion.history"])
    assert history == (["none", "1", "3"] if codes["3"] == 0 else ["none", "1"])
