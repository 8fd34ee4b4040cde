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
    if isinstance(base, dict) and isinstance(overlay, dict):
        for key, value in overlay.items():
            base[key] = _merge(base[key], value) if key in base else value
        return base
    return overlay


def apply_profile(params: Path, overlay_path: Path) -> None:
    if not overlay_path.is_file():
        names = sorted(p.stem for p in overlay_path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no profile {overlay_path} (available: {names})")
    yaml = YAML()
    yaml.width = 120
    doc = yaml.load(params.read_text())
    overlay = YAML(typ="safe").load(overlay_path.read_text()) or {}
    merged = _merge(doc, overlay)
    merged["profile"] = overlay_path.stem
    plain = YAML(typ="safe").load(_dump(yaml, merged))
    parse_settings(plain, params)  # refuse to write an invalid file
    params.write_text(_dump(yaml, merged))


def _dump(yaml: YAML, data: Any) -> str:
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()
