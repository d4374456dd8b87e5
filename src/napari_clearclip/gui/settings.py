"""Widget settings that persist between sessions (last classes, model, device ...)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import platformdirs

CONFIG_ENV = "NAPARI_CLEARCLIP_CONFIG_DIR"


def settings_path() -> Path:
    override = os.environ.get(CONFIG_ENV)
    base = Path(override) if override else Path(platformdirs.user_config_dir("napari-clearclip"))
    return base / "settings.json"


def load_settings() -> dict:
    try:
        with open(settings_path(), encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_settings(values: dict) -> None:
    from ..files import write_atomic

    path = settings_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda p: p.write_text(json.dumps(values, indent=2), encoding="utf-8"))
    except OSError:
        pass  # settings are a convenience; never fail a run over them
