"""Every change to params.yaml takes effect: DVC sees it, and each stage declares what it reads.

DVC 3.x reruns a stage only when its run-cache key changes, and it leaves any key named
``size`` or ``nfiles`` out of that key, params included (treeverse/dvc issue 10296): a change
to such a setting restores an old run's outputs instead of rerunning. These tests guard the
whole class of bug: they hash each stage's params exactly as DVC's run cache does, changing
one declared setting at a time, and check that every pipeline module reads only settings its
stage declares.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo
from dvc.stage.cache import _get_cache_hash

from retfm.settings import (
    DVC_ISSUE,
    SettingsError,
    invisible_keys,
    parse_settings,
)

ROOT = Path(__file__).resolve().parents[1]
#: Settings a stage may read without declaring them: where things are, not what the study is.
#: validation.workers only sets how many processes decode images (same bytes either way);
#: recipe_digest hashes model and the FM's pretrain keys, which pretrain@ declares one by one.
UNDECLARED_OK = ("paths", "tracking", "digest", "recipe_digest", "validation.workers")


def _leaves(value: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*path, k))]
    return [path]


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1 if value == 0 else value * 2
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, list):
        if len(set(map(str, value))) > 1:
            return [*reversed(value)]
        return [*value, *value] if value else ["changed"]
    if value is None:
        return "set"
    return {"changed": True}


def _set(values: dict, path: tuple, new: Any) -> dict:
    out = copy.deepcopy(values)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return out


def _run_cache_key(cmd: str, params: dict) -> str:
    """DVC's run-cache key of a stage, restricted to its command and params (the part a
    params change can move); ``_get_cache_hash`` is what ``dvc repro`` uses."""
    return _get_cache_hash({"cmd": cmd, "params": {"params.yaml": params}}, key=True)


def _declared() -> list[tuple[str, str, dict]]:
    with Repo(str(ROOT)) as repo:
        out = []
        for stage in repo.index.stages:
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency) and dep.def_path == "params.yaml":
                    out.append((stage.addressing, stage.cmd, dep.read_params()))
        return out


def test_every_declared_setting_changes_its_stages_run_cache_key() -> None:
    """Change each declared setting alone: the stage's run-cache key must change, or
    ``dvc repro`` would restore an old run ("Stage ... is cached - skipping run")."""
    unseen = []
    checked = 0
    for stage, cmd, params in _declared():
        base = _run_cache_key(cmd, params)
        for name, value in params.items():
            for leaf in _leaves(value):
                path = (name, *leaf)
                changed = _set(params, path, _changed(_get(params, path)))
                checked += 1
                if _run_cache_key(cmd, changed) == base:
                    unseen.append(f"{stage}: {'.'.join(map(str, path))}")
    assert checked > 200
    assert not unseen, (
        f"DVC's run cache cannot see these settings ({DVC_ISSUE}); rename them:\n"
        + "\n".join(unseen)
    )


def _get(values: dict, path: tuple) -> Any:
    for key in path:
        values = values[key]
    return values


def test_the_guard_itself_catches_a_size_key() -> None:
    params = {"cohort": {"size": 1500, "strategy": "random"}}
    changed = _set(params, ("cohort", "size"), 1400)
    assert _run_cache_key("x", params) == _run_cache_key("x", changed)  # the upstream bug


@pytest.mark.parametrize(
    "source", ["params.yaml", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("profiles/*"))]
)
def test_no_setting_is_named_so_that_dvc_cannot_see_it(source: str) -> None:
    hidden = invisible_keys(yaml.safe_load((ROOT / source).read_text()))
    assert not hidden, f"{source}: {hidden} are invisible to DVC's run cache ({DVC_ISSUE})"


def test_an_old_params_file_names_the_new_key() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["cohort"]["size"] = raw["cohort"].pop("images_per_site")
    with pytest.raises(SettingsError) as err:
        parse_settings(raw)
    message = str(err.value)
    assert "cohort.size: renamed: use cohort.images_per_site" in message
    assert DVC_ISSUE in message


def _reads(module: Path) -> set[str]:
    """``settings.<section>[.<key>]`` read by a pipeline module (the typed settings object):
    the first two names of every attribute chain that starts at ``settings``."""
    chains: dict[int, list[str]] = {}
    inner: set[int] = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Attribute):
            names, cur = [], node
            while isinstance(cur, ast.Attribute):
                names.append(cur.attr)
                cur = cur.value
                inner.add(id(cur))
            if isinstance(cur, ast.Name) and cur.id == "settings":
                chains[id(node)] = names[::-1]
    return {".".join(c[:2]) for key, c in chains.items() if key not in inner}


def _covered(read: str, declared: list[str]) -> bool:
    section = read.split(".")[0]
    if read in UNDECLARED_OK or section in UNDECLARED_OK:
        return True
    return any(read == d or read.startswith(d + ".") or d.startswith(read + ".")
               or d == section for d in declared)  # fmt: skip


def test_each_pipeline_module_reads_only_settings_its_stages_declare() -> None:
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = []
    for name, spec in dvc_yaml.items():
        body = spec.get("do", spec)
        module = body["cmd"].split("-m pipelines.")[1].split()[0]
        declared = [p for p in body.get("params", []) if isinstance(p, str)]
        for read in sorted(_reads(ROOT / "pipelines" / f"{module}.py")):
            if (
                "." not in read
                and read not in UNDECLARED_OK
                and not any(d == read or d.startswith(read + ".") for d in declared)
            ):
                # a whole section handed on (e.g. settings.cohort) must be declared whole
                missing.append(f"{name}: settings.{read}")
            elif "." in read and not _covered(read, declared):
                missing.append(f"{name}: settings.{read}")
    assert not missing, "stages read settings they do not declare in dvc.yaml:\n" + "\n".join(
        missing
    )
