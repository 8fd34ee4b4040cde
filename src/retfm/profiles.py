"""Profiles: partial ``params.yaml`` overlays (``profiles/<name>.yaml``) for other scales.

``params.yaml`` stays the single file DVC and the settings read; a profile rewrites the keys it
names there (comments and order kept), and the result must validate before it is written.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from retfm.settings import PathSettings, StudySettings, parse_settings

#: The comment above the generated last section of params.yaml.
_NOTE_LINES = (
    "# ---- Written by `retfm expand` from study.fms x study.replicates; never edit by hand ----",
    "# (every stage stops when it is stale). DVC cannot expand a count into stages, nor read a",
    "# dict entry inside a matrix, so dvc.yaml's replicated stages iterate over these keys.",
)


def _merge(base: Any, overlay: Any) -> Any:
    """Overlay ``overlay`` on ``base``: mappings merge key by key, anything else (an empty
    mapping included: ``alignment: {}`` clears it) replaces."""
    if isinstance(base, dict) and isinstance(overlay, dict) and overlay:
        for key, value in overlay.items():
            base[key] = _merge(base[key], value) if key in base else value
        return base
    return overlay


def apply_profile(params: Path, overlay_path: Path) -> None:
    if not overlay_path.is_file():
        names = sorted(p.stem for p in overlay_path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no profile {overlay_path} (available: {names})")
    overlay = YAML(typ="safe").load(overlay_path.read_text()) or {}
    apply_overrides(params, {**overlay, "profile": overlay_path.stem})


def apply_overrides(params: Path, overlay: dict[str, Any]) -> None:
    """Rewrite the keys ``overlay`` names in ``params`` (comments and order kept) and its
    ``expanded`` section; the result must validate before it is written."""
    yaml = YAML()
    yaml.width = 120
    doc = yaml.load(params.read_text())
    text = _dump(yaml, _merge(doc, overlay)) if overlay else params.read_text()
    _write_valid(params, with_expansion(text))


def expand_params(params: Path) -> bool:
    """Rewrite ``params``' ``expanded`` section from its ``study`` (``retfm expand``), leaving
    every other line as it is; returns whether anything changed."""
    before = params.read_text()
    after = with_expansion(before)
    _write_valid(params, after)
    return after != before


def _write_valid(params: Path, text: str) -> None:
    parse_settings(YAML(typ="safe").load(text), params)  # refuse to write an invalid file
    params.write_text(text)


def with_expansion(text: str) -> str:
    """``text`` (a params.yaml) with its ``expanded`` section rewritten from its study: the
    section is the file's last block, below :data:`EXPANDED_NOTE`."""
    from retfm.fms import expansion

    head = text.split(_NOTE_LINES[0], 1)[0]
    head = head.split("\nexpanded:", 1)[0].rstrip("\n") + "\n"
    plain = YAML(typ="safe").load(head) or {}
    try:
        study = StudySettings.model_validate(plain.get("study") or {})
        paths = PathSettings.model_validate(plain.get("paths") or {})
    except Exception:  # noqa: BLE001 - parse_settings then names what is wrong, by key
        return text
    lines = ["", *_NOTE_LINES, "expanded:"]
    for part, entries in expansion(study, paths.outputs).items():
        lines.append(f"  {part}:" + ("" if entries else " {}"))
        for key, entry in entries.items():
            flow = yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=10**6)
            lines.append(f"    {key}: {flow.strip()}")
    return head + "\n".join(lines) + "\n"


def _dump(yaml: YAML, data: Any) -> str:
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


def fresh_copy(source: Path, dest: Path, profile: str | None = None) -> Path:
    """Copy the files git would ship from ``source`` into ``dest`` and make that a git repo of
    its own (a colleague's fresh clone, without the network), then apply ``profile``.

    Used by the end-to-end tests and the recovery benchmark.
    """
    import shutil
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for rel in (f for f in listed if f and (source / f).is_file()):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, target)
    git = ["git", "-c", "user.email=retfm@localhost", "-c", "user.name=retfm"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fresh copy"]):
        subprocess.run([*git, *cmd], cwd=dest, check=True, capture_output=True)
    if profile is not None:
        apply_profile(dest / "params.yaml", dest / "profiles" / f"{profile}.yaml")
    return dest
