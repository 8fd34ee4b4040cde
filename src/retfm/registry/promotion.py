"""Gated promotion: ``champion`` moves to a version only when every gate passes.

Gates read the evaluation the study recorded on each version (``eval.*`` tags, written by the
compare stage) so that candidate and champion are judged on the same evaluation data
(``eval.data``). A refusal changes nothing but the audit trail. Promotions are serialised by a
lock held across read-champion -> check -> move-alias, so two concurrent promotions cannot leave
the alias on a version whose gates were checked against a stale champion.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.tracking import MlflowClient

from retfm.registry.lineage import missing_lineage
from retfm.registry.models import CANDIDATE, CHAMPION
from retfm.settings import PromotionSettings

HISTORY_TAG = "champion.history"
NO_CHAMPION = "none"  # in the history: there was no champion before
LOCK_TIMEOUT_S = 120


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    value: str
    limit: str

    def line(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        return f"  [{mark}] {self.name}: {self.value} (required {self.limit})"


@dataclass
class Decision:
    model: str
    version: str | None
    promoted: bool
    previous_champion: str | None
    gates: list[Gate] = field(default_factory=list)
    who: str = ""
    when: str = ""
    settings: dict = field(default_factory=dict)  # the promotion settings the gates applied

    def report(self) -> str:
        if any(g.name == "rollback" for g in self.gates):
            to = self.version or "no champion (unset)"
            was = self.previous_champion
            return f"ROLLED BACK: {self.model} @{CHAMPION} from version {was} to {to}"
        verdict = "PROMOTED" if self.promoted else "REFUSED"
        target = f"version {self.version}" if self.version else "no version (champion unset)"
        head = f"{verdict}: {self.model} {target} -> @{CHAMPION}"
        prev = f"  (champion was: {self.previous_champion or 'none'})"
        return "\n".join([head, prev, *(g.line() for g in self.gates)])

    def to_dict(self) -> dict:
        return asdict(self)


def _float(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def evaluate_gates(
    cfg: PromotionSettings,
    candidate: dict[str, str],
    champion: dict[str, str] | None,
    factors: list[str],
    *,
    allow_other_settings: bool = False,
) -> list[Gate]:
    """Every gate, with the values compared; pure so that it can be tested on plain dicts."""
    metric = cfg.metric
    gates: list[Gate] = [_settings_gate(cfg, candidate, allow_other_settings)]
    missing = missing_lineage(candidate)
    gates.append(
        Gate(
            "lineage complete",
            not missing,
            ", ".join(missing) or "all tags present",
            "data, cohort, commit, params, recipe, site, weights",
        )
    )
    overall = _float(candidate, f"eval/{metric}")
    gates.append(
        Gate(
            f"{metric} floor",
            overall is not None and overall >= cfg.floor,
            "not evaluated" if overall is None else f"{overall:.4f}",
            f">= {cfg.floor}",
        )
    )
    if champion is not None:
        cand_data, champ_data = candidate.get("eval.data"), champion.get("eval.data")
        same_data = cand_data is not None and cand_data == champ_data
        champ = _float(champion, f"eval/{metric}")
        ok = (
            same_data
            and overall is not None
            and champ is not None
            and (overall >= champ - cfg.max_drop_vs_champion)
        )
        value = (
            f"{overall} vs champion {champ}"
            if same_data
            else f"evaluation data differ ({cand_data} vs {champ_data})"
        )
        gates.append(
            Gate(
                f"{metric} vs champion",
                ok,
                value,
                f"drop <= {cfg.max_drop_vs_champion} on the same evaluation data",
            )
        )
    for factor in factors:
        worst = _float(candidate, f"eval/worst/{metric}/{factor}")
        gap = _float(candidate, f"eval/gap/{metric}/{factor}")
        # A missing or unreadable count is as bad as undefined groups: never assume zero.
        undefined = _float(candidate, f"eval/n_undefined/{factor}")
        gates.append(
            Gate(
                f"worst {factor} group {metric}",
                worst is not None and worst >= cfg.min_worst_group,
                "not evaluated" if worst is None else f"{worst:.4f}",
                f">= {cfg.min_worst_group}",
            )
        )
        gates.append(
            Gate(
                f"{factor} gap",
                gap is not None and gap <= cfg.max_gap,
                "not evaluated" if gap is None else f"{gap:.4f}",
                f"<= {cfg.max_gap}",
            )
        )
        gates.append(_judgeable(cfg, candidate, factor, undefined))
    return gates


def _settings_gate(cfg: PromotionSettings, candidate: dict[str, str], allow: bool) -> Gate:
    """The gates are the study's own: the promotion settings the study recorded on the version
    (``eval.promotion_settings``) must be the ones applied now, or the difference is loud."""
    from retfm.registry.evaluation import settings_digest

    given, recorded = (
        settings_digest(cfg.model_dump(mode="json")),
        candidate.get("eval.promotion_settings"),
    )
    if recorded is None:
        return Gate("promotion settings are the study's", False, "not evaluated",
                    "the promotion settings the study recorded")  # fmt: skip
    if given == recorded:
        return Gate("promotion settings are the study's", True, f"{given}", f"{recorded}")
    value = f"OTHER settings {given} (the study recorded {recorded})"
    limit = (
        "the study's settings; --allow-other-settings given: recorded"
        if allow
        else ("the study's settings (or --allow-other-settings, recorded in the decision)")
    )
    return Gate("promotion settings are the study's", allow, value, limit)


def _judgeable(cfg: PromotionSettings, tags: dict[str, str], factor: str,
               undefined: float | None) -> Gate:  # fmt: skip
    """No subgroup passes silently: undefined groups fail the gate or, as
    ``promotion.undefined_groups`` says, are left out by name."""
    name = f"{factor} groups judgeable"
    limit = {"refuse": "0 undefined groups", "exclude_small": "0 undefined groups that are not "
             "just small (small ones left out: promotion.undefined_groups)",
             "exclude": "any (undefined groups left out: promotion.undefined_groups)"}  # fmt: skip
    if undefined is None or not math.isfinite(undefined):
        return Gate(name, False, "not evaluated", limit[cfg.undefined_groups])
    small = _float(tags, f"eval/n_undefined_small/{factor}") or 0.0
    names = tags.get(f"eval.undefined_groups.{factor}", "none")
    blocking = {"refuse": undefined, "exclude_small": undefined - small, "exclude": 0.0}
    count = int(blocking[cfg.undefined_groups])
    value = f"{int(undefined)} undefined ({int(small)} only under {cfg.min_group_size} images)"
    if undefined:
        value += f": {names}"
    return Gate(name, count == 0, value, limit[cfg.undefined_groups])


def lock_path(tracking_uri: str) -> Path:
    """The promotion lock file for a store. A relative sqlite path is resolved first, so that
    ``sqlite:///mlruns/mlflow.db`` and its absolute spelling share one lock. (A remote server is
    only serialised among promotions run from this machine.)"""
    uri = str(tracking_uri)
    if uri.startswith("sqlite:///"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"retfm-promote-{key}.lock"


def _lock_for(client: MlflowClient) -> FileLock:
    return FileLock(str(lock_path(client.tracking_uri)), timeout=LOCK_TIMEOUT_S)


def _champion(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return None


class PromotionError(RuntimeError):
    """The promotion or rollback cannot even be judged (unknown model, version or alias)."""


def _resolve(client: MlflowClient, name: str, version: str | None) -> str:
    try:
        if version is None or version == CANDIDATE:
            return str(client.get_model_version_by_alias(name, CANDIDATE).version)
        return str(client.get_model_version(name, version).version)
    except mlflow.exceptions.MlflowException as err:
        wanted = f"@{CANDIDATE}" if version in (None, CANDIDATE) else f"version {version}"
        raise PromotionError(f"{name}: no {wanted} in the registry ({err.message})") from None


def _record(client: MlflowClient, decision: Decision, experiment_id: str) -> None:
    payload = json.dumps(decision.to_dict(), sort_keys=True)
    if decision.version is not None:
        client.set_model_version_tag(decision.model, decision.version, "promotion.last", payload)
    rollback = any(g.name == "rollback" for g in decision.gates)
    outcome = "rollback" if rollback else ("granted" if decision.promoted else "refused")
    run = client.create_run(
        experiment_id,
        run_name=f"promote-{decision.model}-v{decision.version or 'none'}-{outcome}",
        tags={
            "model": decision.model,
            "model.version": decision.version or "none",
            "promoted": str(decision.promoted).lower(),
            "outcome": outcome,
            "settings.other": str(
                any(
                    g.name == "promotion settings are the study's" and g.value.startswith("OTHER")
                    for g in decision.gates
                )
            ).lower(),
        },
    )
    client.log_text(run.info.run_id, payload, "promotion.json")
    client.set_terminated(run.info.run_id)


def promote(
    client: MlflowClient,
    name: str,
    version: str | None,
    cfg: PromotionSettings,
    factors: list[str],
    experiment_id: str,
    *,
    allow_other_settings: bool = False,
) -> Decision:
    """Check the gates and move ``champion`` when all pass; returns the recorded decision."""
    with _lock_for(client):
        target = _resolve(client, name, version)
        previous = _champion(client, name)
        cand_tags = dict(client.get_model_version(name, target).tags)
        champ_tags = (
            dict(client.get_model_version(name, previous).tags)
            if previous and previous != target
            else None
        )
        gates = evaluate_gates(cfg, cand_tags, champ_tags, factors,
                               allow_other_settings=allow_other_settings)  # fmt: skip
        # re-promoting the champion: its predecessor is the one before it, not itself
        predecessor = previous
        if previous == target:
            earlier = _history(client, name)
            predecessor = earlier[-1] if earlier else None
        decision = Decision(
            name,
            target,
            all(g.passed for g in gates),
            predecessor,
            gates,
            who=_who(),
            when=datetime.now(UTC).isoformat(),
            settings=cfg.model_dump(mode="json"),
        )
        if decision.promoted and previous != target:
            history = _history(client, name)
            history.append(previous or NO_CHAMPION)  # the first promotion rolls back to none
            client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
            client.set_registered_model_alias(name, CHAMPION, target)
        _record(client, decision, experiment_id)
    return decision


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown"


def _history(client: MlflowClient, name: str) -> list[str]:
    try:
        raw = client.get_registered_model(name).tags.get(HISTORY_TAG, "[]")
    except mlflow.exceptions.MlflowException as err:
        raise PromotionError(f"{name}: no such registered model ({err.message})") from None
    return [str(v) for v in json.loads(raw)]


def rollback(client: MlflowClient, name: str, experiment_id: str) -> Decision:
    """Move ``champion`` back to the version it pointed at before the last promotion (or unset
    it, when that promotion was the first)."""
    with _lock_for(client):
        history = _history(client, name)
        current = _champion(client, name)
        if not history:
            raise PromotionError(
                f"{name}: no promotion to roll back (champion is {current or 'unset'}; the "
                "history is recorded by `retfm promote`)"
            )
        previous = history.pop()
        if previous == NO_CHAMPION:
            client.delete_registered_model_alias(name, CHAMPION)
        else:
            client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        target = None if previous == NO_CHAMPION else previous
        decision = Decision(
            name,
            target,
            True,
            current,
            [Gate("rollback", True, f"from {current} to {target or 'no champion'}", "-")],
            who=_who(),
            when=datetime.now(UTC).isoformat(),
        )
        _record(client, decision, experiment_id)
    return decision
