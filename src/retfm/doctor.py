"""``retfm doctor``: do the study's records agree with each other?

A study's truth is spread over ``params.yaml``, ``dvc.lock`` (what each stage ran with and
produced), the stage outputs (data cards, registrations), and the tracking store (registry
versions with lineage tags). A stale or tampered record in any of them makes every later
claim about the data an FM saw untrustworthy, so the doctor cross-checks them and names each
disagreement. It only reads; the fix is always a command it prints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retfm import tracking
from retfm.fms import Replicate, study_replicates
from retfm.registry.lineage import check_cohort_card, weights_digest
from retfm.settings import Settings


@dataclass(frozen=True)
class Finding:
    check: str
    subject: str
    ok: bool
    detail: str = ""


def _yaml(path: Path) -> Any:
    """YAML 1.2 as DVC reads it (PyYAML's 1.1 reads ``1e-06`` as a string)."""
    from ruamel.yaml import YAML

    return YAML(typ="safe").load(path.read_text())


def _lock(root: Path) -> dict[str, Any]:
    path = root / "dvc.lock"
    return (_yaml(path) or {}).get("stages", {}) if path.is_file() else {}


def _dotted(values: dict[str, Any], name: str) -> Any:
    node: Any = values
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<missing>"
        node = node[part]
    return node


def _diff(recorded: Any, current: Any, path: str) -> Iterator[str]:
    if isinstance(recorded, dict) and isinstance(current, dict):
        for key in sorted(set(recorded) | set(current), key=str):
            yield from _diff(recorded.get(key, "<missing>"), current.get(key, "<missing>"),
                             f"{path}.{key}")  # fmt: skip
    elif recorded != current:
        yield f"{path}: dvc.lock has {recorded!r}, params.yaml {current!r}"


def _pipeline_stages(root: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {stage.addressing for stage in repo.index.stages}


def check_params(root: Path) -> list[Finding]:
    """Every stage of the pipeline that dvc.lock records ran with the settings params.yaml holds
    now. (Entries of stages no longer in dvc.yaml, e.g. after an FM was renamed, are left:
    DVC keeps them and nothing reads them.)"""
    params = _yaml(root / "params.yaml") or {}
    current = _pipeline_stages(root)
    out = []
    for stage, entry in _lock(root).items():
        if stage not in current:
            continue
        recorded = (entry.get("params") or {}).get("params.yaml", {})
        diffs = [d for name, value in recorded.items()
                 for d in _diff(value, _dotted(params, name), name)]  # fmt: skip
        out.append(Finding("settings", stage, not diffs,
                           "; ".join(diffs[:4]) + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4
                                                    else "") + (f" -> run: dvc repro {stage}"
                                                               if diffs else "")))  # fmt: skip
    return out


def check_outputs(root: Path) -> list[Finding]:
    """Stage outputs and dependencies on disk are what dvc.lock recorded (DVC's own status)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        status = repo.status()
    findings = []
    for stage, changes in sorted(status.items()):
        parts = []
        for change in changes:
            if isinstance(change, dict):
                for kind, items in change.items():
                    if kind == "changed params":
                        continue  # reported by check_params, with the values
                    if isinstance(items, dict):
                        parts += [f"{path} {state}" for path, state in items.items()]
                    else:
                        parts.append(f"{kind}: {items}")
            else:
                parts.append(str(change))
        if parts:
            findings.append(Finding("outputs", stage, False,
                                    "; ".join(parts) + f" -> run: dvc repro {stage}"))  # fmt: skip
    if not findings:
        findings.append(Finding("outputs", "all stages", True, "as dvc.lock recorded"))
    return findings


def check_cohorts(settings: Settings, root: Path) -> list[Finding]:
    """Each cohort's (site x replicate) data card was sampled with params.yaml's cohort
    settings, from this data."""
    data_md5 = tracking.dvc_hash(root / "data.dvc")
    out = []
    for site in settings.expanded.cohorts:  # one cohort per site and replicate
        card_path = root / settings.paths.outputs / "cohorts" / site / "card" / "card.json"
        if not card_path.is_file():
            out.append(Finding("data card", site, False, f"{card_path} missing -> dvc repro"))
            continue
        card = json.loads(card_path.read_text())
        try:
            check_cohort_card(card, settings.cohort.model_dump(mode="json"), site)
            problems = []
        except ValueError as err:
            problems = [str(err)]
        if card.get("data", {}).get("dvc_hash") != data_md5:
            problems.append(
                f"card says data {card.get('data', {}).get('dvc_hash')}, data.dvc {data_md5}"
            )
        out.append(Finding("data card", site, not problems, "; ".join(problems)))
    return out


def _registered(client: Any, record: dict[str, Any]) -> Any:
    from retfm.registry.models import recorded_version

    version = recorded_version(client, record)
    return client.get_model_version(record["name"], version)


def check_registry(settings: Settings, root: Path) -> list[Finding]:
    """Each FM's registry version carries the lineage of the outputs it was built from."""
    client = tracking.configure(settings)
    data_md5 = tracking.dvc_hash(root / "data.dvc")
    out = []
    for fm in study_replicates(settings):
        reg_path = root / settings.paths.outputs / "register" / fm.name / "registration.json"
        if not reg_path.is_file():
            out.append(Finding("registry", fm.model_name, False, "not registered -> dvc repro"))
            continue
        record = json.loads(reg_path.read_text())
        if "weights_content" not in record:
            out.append(
                Finding(
                    "registry",
                    fm.model_name,
                    False,
                    "registration.json predates "
                    f"content-keyed records -> dvc repro -f register@{fm.name}",
                )
            )
            continue
        try:
            mv = _registered(client, record)
        except Exception as err:  # noqa: BLE001 - any lookup failure is the finding
            out.append(Finding("registry", record["name"], False, str(err)))
            continue
        tags = mv.tags
        weights = root / settings.paths.outputs / "pretrain" / fm.name / "encoder.safetensors"
        expected = {
            "data.md5": data_md5,
            "weights.content": weights_digest(weights) if weights.is_file() else "<missing>",
            **fm.tags(),
        }
        if not fm.imported:  # as the register stage tags it
            expected["cohort.md5"] = tracking.lock_hash(
                f"cohort@{fm.cohort}", f"outputs/cohorts/{fm.cohort}", root / "dvc.lock"
            )
        wrong = [f"{k}: registry {tags.get(k)!r}, outputs {v!r}" for k, v in expected.items()
                 if tags.get(k) != v]  # fmt: skip
        wrong += _card_mismatch(root, settings, fm, mv)
        subject = f"{record['name']} v{mv.version}"
        out.append(Finding("registry", subject, not wrong, "; ".join(wrong)))
    return out


def _card_mismatch(root: Path, settings: Settings, fm: Replicate, mv: Any) -> list[str]:
    """The data card attached to the version is the FM's data card on disk (its cohort's, or
    the card of the checkpoint it was imported from)."""
    import mlflow

    local = root / settings.paths.outputs / "pretrain" / fm.name / "data_card.json"
    if not local.is_file():
        return ["no data card in the FM's outputs -> dvc repro"]
    try:
        from mlflow.tracking import MlflowClient

        from retfm.registry.models import logged_model_id

        location = MlflowClient().get_logged_model(logged_model_id(mv)).artifact_location
        attached = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location}/extra_files/data_card.json"
            )
        )
    except Exception as err:  # noqa: BLE001 - an unreachable artifact is the finding
        return [f"attached data card unreadable ({type(err).__name__}: {err})"]
    theirs, ours = json.loads(attached.read_text()), json.loads(local.read_text())
    keys = ("size", "data", "sampling", "checkpoint")
    return [f"attached data card differs in {k!r}" for k in keys if theirs.get(k) != ours.get(k)]


def examine(settings: Settings, root: Path = Path(".")) -> list[Finding]:
    """Every check, in the order a reader would follow the study's lineage."""
    findings = check_params(root) + check_outputs(root) + check_cohorts(settings, root)
    try:
        findings += check_registry(settings, root)
    except tracking.StoreMovedError as err:
        findings.append(Finding("tracking store", tracking.tracking_uri(settings), False, str(err)))
    return findings
