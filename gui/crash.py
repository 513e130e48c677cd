"""Crash safety for the GUI process: a rotating log file in the user data folder, faulthandler
into it (hard crashes leave a trace), and an exception hook that shows the error in a dialog with
a "Copy details" button instead of a silent exit. (The worker runs in its own process: its
crashes reach the window as a failed job, never take it down.)"""
from __future__ import annotations

import faulthandler
import logging
import sys
import traceback
from logging.handlers import RotatingFileHandler
from pathlib import Path

LOG_NAME = "squeeze-studio.log"
log = logging.getLogger("squeeze.studio")
_fault_file = None   # kept open for faulthandler
_dialogs: list = []  # open crash dialogs (kept alive while shown)


def log_file() -> Path:
    from core import paths
    d = paths.data_dir() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d / LOG_NAME


def setup_logging(faults: bool = True) -> Path:
    """Logs to a file rotated at 1 MB (3 kept); faulthandler writes native crashes beside it."""
    global _fault_file
    f = log_file()
    if not any(isinstance(h, RotatingFileHandler) and Path(h.baseFilename) == f for h in log.handlers):
        h = RotatingFileHandler(f, maxBytes=1_000_000, backupCount=3, encoding="utf-8")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
    if faults and _fault_file is None:
        _fault_file = open(f.with_suffix(".faults"), "a", encoding="utf-8")
        faulthandler.enable(_fault_file)
    return f


def details(etype, value, tb) -> str:
    return "".join(traceback.format_exception(etype, value, tb))


def show_error(etype, value, tb):
    """The exception hook: write the traceback to the log, then show it in a dialog."""
    text = details(etype, value, tb)
    log.error("unhandled exception\n%s", text)
    try:
        from PySide6.QtWidgets import QApplication, QMessageBox
    except ImportError:
        sys.__excepthook__(etype, value, tb)
        return None
    if QApplication.instance() is None:
        sys.__excepthook__(etype, value, tb)
        return None
    box = QMessageBox(QMessageBox.Critical, "Squeeze Studio — something went wrong",
                      f"{etype.__name__}: {value}\n\nThe app keeps running; the details are in the log "
                      f"({log_file()}).")
    box.setDetailedText(text)
    copy = box.addButton("Copy details", QMessageBox.ActionRole)
    box.addButton(QMessageBox.Close)
    copy.clicked.disconnect()  # copying must not close the dialog
    copy.clicked.connect(lambda: QApplication.clipboard().setText(text))
    box.finished.connect(lambda _: _dialogs.remove(box) if box in _dialogs else None)
    _dialogs.append(box)
    box.open()  # not exec(): a hook must not spin a nested event loop
    return box


def install() -> Path:
    f = setup_logging()
    sys.excepthook = show_error
    return f
