"""Evaluation settings: the text (default: the shipped slice), tokens, context and the decode
benchmark. Runs are comparable only under the same settings (their `EvalSettings.key()`)."""
from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QPushButton,
                               QSpinBox, QToolButton)

from core.evaluate import EvalSettings


def _spin(lo: int, hi: int, step: int, tip: str) -> QSpinBox:
    s = QSpinBox()
    s.setRange(lo, hi)
    s.setSingleStep(step)
    s.setToolTip(tip)
    s.setKeyboardTracking(False)  # one change per edit, not per keystroke
    s.setMinimumWidth(56)  # its size hint is sized for the maximum (8 digits): the panel could not narrow
    return s


def _row(*items) -> QHBoxLayout:
    """Widgets with short labels between them, on one line."""
    row = QHBoxLayout()
    for it in items:
        row.addWidget(QLabel(it) if isinstance(it, str) else it, 0 if isinstance(it, str) else 1)
    return row


class EvalPanel(QGroupBox):
    changed = Signal()

    def __init__(self, parent=None):
        super().__init__("Evaluation", parent)
        form = QFormLayout(self)
        form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
        form.setRowWrapPolicy(QFormLayout.WrapLongRows)  # narrow (larger fonts): a row goes under its label
        self.text = QLineEdit()
        self.text.setPlaceholderText("shipped WikiText-2 slice")
        self.text.setToolTip("Plain-text file whose perplexity is measured; empty = the shipped slice")
        self.text.editingFinished.connect(self.changed)
        browse = QToolButton()
        browse.setText("…")
        browse.setToolTip("Pick a text file")
        browse.clicked.connect(self._pick_text)
        self.shipped = QPushButton("shipped")
        self.shipped.setToolTip("Use the shipped evaluation text")
        self.shipped.clicked.connect(self._use_shipped)
        row = QHBoxLayout()
        row.addWidget(self.text, 1)
        row.addWidget(browse)
        row.addWidget(self.shipped)
        form.addRow("text", row)
        self.max_tokens = _spin(16, 10_000_000, 512, "Score the first this many tokens of the text")
        self.context = _spin(2, 32_768, 128, "Tokens per scored window (non-overlapping)")
        form.addRow("max tokens", _row(self.max_tokens, "context", self.context))
        self.prompt_tokens = _spin(1, 8192, 16, "Decode benchmark: prompt length")
        self.new_tokens = _spin(1, 4096, 8, "Decode benchmark: greedy tokens generated with the KV cache")
        self.repeats = _spin(1, 1000, 1, "Decode benchmark: median of this many timed runs, after a warm-up")
        form.addRow("speed: prompt", _row(self.prompt_tokens, "new", self.new_tokens, "×", self.repeats))
        for s in (self.max_tokens, self.context, self.prompt_tokens, self.new_tokens, self.repeats):
            s.valueChanged.connect(self.changed)
        self.set_settings(EvalSettings().to_dict())

    def settings(self) -> EvalSettings:
        return EvalSettings(text=self.text.text().strip() or None, max_tokens=self.max_tokens.value(),
                            context=self.context.value(), prompt_tokens=self.prompt_tokens.value(),
                            new_tokens=self.new_tokens.value(), repeats=self.repeats.value())

    def set_settings(self, d: dict) -> None:
        s = EvalSettings(**{**EvalSettings().to_dict(), **(d or {})})
        self.blockSignals(True)
        self.text.setText(s.text or "")
        for name in ("max_tokens", "context", "prompt_tokens", "new_tokens", "repeats"):
            getattr(self, name).setValue(int(getattr(s, name)))
        self.blockSignals(False)

    def _use_shipped(self) -> None:
        self.text.clear()
        self.changed.emit()

    def _pick_text(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Evaluation text", "", "Text files (*.txt *.raw *.tokens);;All files (*)")
        if f:
            self.text.setText(f)
            self.changed.emit()
