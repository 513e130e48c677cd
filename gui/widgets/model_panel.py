"""Model picker and facts. Facts come from `core.models.info(convert=False)` on a plain thread:
it reads JSON headers only; a bundled model not converted yet has no numbers until the first
job converts it (in the worker, never here)."""
from __future__ import annotations

import threading
from pathlib import Path

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import (QComboBox, QFileDialog, QGridLayout, QGroupBox, QHBoxLayout, QLabel,
                               QPushButton, QVBoxLayout)

from core import models
from core.errors import SqueezeError
from core.results import fmt_count, fmt_mb
from gui.widgets.layout import narrow


def display_name(model_id: str) -> str:
    if model_id in models.BUNDLED:
        return f"{models.BUNDLED[model_id]['name']} (bundled)"
    p = Path(model_id)
    return f"{p.name} ({p.parent.name})" if p.parent.name else model_id


class _Facts(QObject):
    done = Signal(str, object)  # model id, ModelInfo or the error message


class ModelPanel(QGroupBox):
    """Emits `chosen(model_id)` when the user picks a model; `facts(model_id, info_or_error)`
    when its facts are read."""
    chosen = Signal(str)
    facts = Signal(str, object)

    def __init__(self, parent=None):
        super().__init__("Model", parent)
        self.model_id = ""
        self.info = None
        lay = QVBoxLayout(self)
        self.combo = QComboBox()
        narrow(self.combo, chars=20)
        self.combo.activated.connect(self._activated)
        lay.addWidget(self.combo)
        row = QHBoxLayout()
        self.open_folder = QPushButton("Open folder…")
        self.open_folder.setToolTip("A Hugging Face model folder (config.json + .safetensors) or a saved variant")
        self.open_folder.clicked.connect(self.pick_folder)
        self.open_gguf = QPushButton("Open .gguf…")
        self.open_gguf.setToolTip("A GGUF file: converted once to a cached safetensors folder")
        self.open_gguf.clicked.connect(self.pick_gguf)
        row.addWidget(self.open_folder)
        row.addWidget(self.open_gguf)
        row.addStretch(1)
        lay.addLayout(row)
        grid = QGridLayout()
        grid.setHorizontalSpacing(8)  # two pairs on a line must fit the left panel at projector fonts
        self.fact_labels = {}
        for i, (key, text) in enumerate((("params", "parameters"), ("size", "on disk"),
                                         ("layers", "layers"), ("dtype", "dtype"))):
            name = QLabel(text)
            name.setStyleSheet("color: palette(mid);")
            value = QLabel("—")
            grid.addWidget(name, i // 2, (i % 2) * 2)
            grid.addWidget(value, i // 2, (i % 2) * 2 + 1)
            self.fact_labels[key] = value
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(3, 1)
        lay.addLayout(grid)
        self.note = QLabel()
        self.note.setWordWrap(True)
        self.note.setVisible(False)
        lay.addWidget(self.note)
        self._facts = _Facts(self)
        self._facts.done.connect(self._got_facts)

    def _activated(self, i: int) -> None:
        self.chosen.emit(self.combo.itemData(i))

    def add_models(self, ids) -> None:
        for mid in ids:
            if mid and self.combo.findData(mid) < 0:
                self.combo.addItem(display_name(mid), mid)
                self.combo.setItemData(self.combo.count() - 1, mid, Qt.ToolTipRole)  # the full id

    def show_model(self, model_id: str) -> None:
        """Selects `model_id` in the combo and reads its facts in the background."""
        self.model_id, self.info = model_id, None
        self.add_models([model_id])
        self.combo.setCurrentIndex(self.combo.findData(model_id))
        for v in self.fact_labels.values():
            v.setText("…")
        self.note.setVisible(False)
        self.refresh_facts()

    def refresh_facts(self) -> None:
        mid = self.model_id

        def read():
            try:
                result = models.info(mid, convert=False)
            except SqueezeError as e:
                result = str(e)
            except Exception as e:  # an unreadable file: a message, not a crash
                result = f"cannot read {mid}: {type(e).__name__}: {e}"
            self._facts.done.emit(mid, result)

        threading.Thread(target=read, daemon=True, name="model-facts").start()

    def _got_facts(self, mid: str, result) -> None:
        if mid != self.model_id:
            return  # an older pick
        if isinstance(result, str):
            for v in self.fact_labels.values():
                v.setText("—")
            self._set_note(result, error=True)
        else:
            self.info = result
            f = self.fact_labels
            f["params"].setText(fmt_count(result.params) or "—")
            f["size"].setText(f"{fmt_mb(result.size_bytes)} MB" if result.size_bytes else "—")
            f["layers"].setText(str(result.layers or "—"))
            f["dtype"].setText(result.dtype or "—")
            if result.params is None:
                self._set_note("Not converted yet: the first job converts it once (about 20 s).", error=False)
            else:
                self.note.setVisible(False)
        self.facts.emit(mid, result)

    def _set_note(self, text: str, error: bool) -> None:
        self.note.setText(text)
        self.note.setStyleSheet("color: #c62828;" if error else "color: palette(mid);")
        self.note.setVisible(True)

    def pick_folder(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Open a model folder")
        if d:
            self.chosen.emit(d)

    def pick_gguf(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Open a GGUF file", "", "GGUF files (*.gguf);;All files (*)")
        if f:
            self.chosen.emit(f)
