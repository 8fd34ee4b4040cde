"""Profiles: partial ``params.yaml`` overlays (``profiles/<name>.yaml``) for other scales.

``params.yaml`` stays the single file DVC and the settings read; a profile rewrites the keys it
names there (comments and order kept), and the result must validate before it is written.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from retfm.settings import parse_settings


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
    """Rewrite the keys ``overlay`` names in ``params`` (comments and order kept); the result
    must validate before it is written."""
    yaml = YAML()
    yaml.width = 120
    doc = yaml.load(params.read_text())
    merged = _merge(doc, overlay)
    plain = YAML(typ="safe").load(_dump(yaml, merged))
    parse_settings(plain, params)  # refuse to write an invalid file
    params.write_text(_dump(yaml, merged))


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
