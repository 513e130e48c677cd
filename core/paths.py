"""Where the app keeps its data, cache and workspace. SQUEEZE_HOME overrides all three."""
from __future__ import annotations

import os
import sys
from pathlib import Path

APP = "squeeze-studio"


def _home() -> Path | None:
    h = os.environ.get("SQUEEZE_HOME")
    return Path(h).expanduser() if h else None


def data_dir() -> Path:
    """Ledger, settings, logs."""
    h = _home()
    if h:
        p = h / "data"
    else:
        import platformdirs
        p = Path(platformdirs.user_data_dir(APP, appauthor=False))
    p.mkdir(parents=True, exist_ok=True)
    return p


def cache_dir() -> Path:
    """Converted models, calibration statistics: can be deleted at any time."""
    h = _home()
    if h:
        p = h / "cache"
    else:
        import platformdirs
        p = Path(platformdirs.user_cache_dir(APP, appauthor=False))
    p.mkdir(parents=True, exist_ok=True)
    return p


def workspace_dir() -> Path:
    """Saved variants and exports."""
    h = _home()
    if h:
        p = h / "workspace"
    else:
        import platformdirs
        p = Path(platformdirs.user_documents_dir()) / "Squeeze Studio"
    p.mkdir(parents=True, exist_ok=True)
    return p


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
