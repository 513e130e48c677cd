"""Where the app keeps its data, cache and workspace. SQUEEZE_HOME overrides all three."""
from __future__ import annotations

import os
import sys
from pathlib import Path

APP = "squeeze-studio"


def _home() -> Path | None:
    h = os.environ.get("SQUEEZE_HOME")
    return Path(h).expanduser() if h else None


def _dir(sub: str, platform_default) -> Path:
    h = _home()
    p = h / sub if h else Path(platform_default())
    p.mkdir(parents=True, exist_ok=True)
    return p


def data_dir() -> Path:
    """Ledger, settings, logs."""
    import platformdirs
    return _dir("data", lambda: platformdirs.user_data_dir(APP, appauthor=False))


def cache_dir() -> Path:
    """Converted models, calibration statistics: can be deleted at any time."""
    import platformdirs
    return _dir("cache", lambda: platformdirs.user_cache_dir(APP, appauthor=False))


def workspace_dir() -> Path:
    """Saved variants and exports."""
    import platformdirs
    return _dir("workspace", lambda: Path(platformdirs.user_documents_dir()) / "Squeeze Studio")


def ledger_path() -> Path:
    return data_dir() / "ledger.sqlite"


def resources_dir() -> Path:
    """resources/ beside the packages; inside a PyInstaller bundle, under its root."""
    base = getattr(sys, "_MEIPASS", None)
    if base:
        return Path(base) / "resources"
    return Path(__file__).resolve().parent.parent / "resources"


def default_eval_text() -> Path:
    return resources_dir() / "data" / "eval.txt"


def default_calib_text() -> Path:
    return resources_dir() / "data" / "calib.txt"
