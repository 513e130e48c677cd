"""Where the app keeps its data, cache and workspace. SQUEEZE_HOME overrides all three."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

APP = "squeeze-studio"
UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(UMASK)


def _home() -> Path | None:
    h = os.environ.get("SQUEEZE_HOME")
    return Path(h).expanduser() if h else None


def make_dir(p: Path) -> Path:
    """mkdir -p, with one clear line where a folder on the way is a link to nowhere (a cache moved to a
    drive that is not mounted): mkdir then says only "File exists"."""
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        from .errors import DataError
        for q in [p, *p.parents]:
            if q.is_symlink() and not q.exists():
                raise DataError(f"{q} is a link to {os.readlink(q)}, which does not exist: connect what it points "
                                "to, or remove the link and the app makes a new folder there") from None
        raise
    return p


def _dir(sub: str, platform_default) -> Path:
    h = _home()
    return make_dir(h / sub if h else Path(platform_default()))


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


def default_distill_text() -> Path:
    """The whole WikiText-2 validation split (calib.txt is its first 200 kB): training gains from distinct text
    where calibration statistics do not (layer prune → distill, 14 minutes: 1.461× fp32 on it, 1.543× on the slice)."""
    return resources_dir() / "data" / "distill.txt"


def check_target(path: Path, name: str = "") -> Path:
    """A file that can be written (its missing folders will be made): not a folder, no file in the way.
    `name` (e.g. "--save") leads the message. Checked before long work, and again when writing."""
    from .errors import SqueezeError
    path = Path(path).expanduser()
    lead = f"{name} {path}" if name else str(path)
    if path.is_dir():
        raise SqueezeError(f"{lead} is a folder; give a file name")
    blocking = next((p for p in path.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise SqueezeError(f"cannot write {lead}: {blocking} is a file, not a folder")
    return path


def write_atomic(path: Path, text: str) -> None:
    """Whole or nothing: a half-written report or recipe never replaces a good one. Each way it can
    fail is one SqueezeError line naming the path."""
    from .errors import SqueezeError
    path = check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        raise SqueezeError(f"cannot write {path}: {e.strerror or e}; pick a folder you can write to") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it private (0600): a report is for sharing, as umask allows
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise SqueezeError(f"cannot write {path}: {e.strerror or e}; pick a folder you can write to") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
