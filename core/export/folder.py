"""Where an export may be written: checked before a job starts (CLI and window alike), so a bad folder is
one message and no failed ledger row. Imports nothing heavy: the window calls it on the GUI thread."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ExportError


def check_export_folder(out: Path) -> None:
    """Refuses a folder an export cannot write into whole (a file, read-only, or holding something other than
    an earlier export, which the new one replaces)."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ExportError(f"cannot export to {out}: {probe} is a file; pick a folder")
    if not os.access(probe, os.W_OK):
        raise ExportError(f"cannot export to {out}: {probe} is not writable; pick another folder")
    if out.exists() and any(out.iterdir()) and not (out / "model.onnx").exists():
        raise ExportError(f"cannot export to {out}: the folder is not empty; pick an empty or new folder")
