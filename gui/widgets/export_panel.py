"""Export the selected run to ONNX, and the verified numbers of its latest export: perplexity
and decode speed in onnxruntime next to torch's, file size; a failed verification in red."""
from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QPushButton,
                               QSizePolicy, QToolButton, QVBoxLayout)

from core.results import fmt_mb, fmt_pct, fmt_ppl, fmt_rate

QUANTIZE = (("fp32", None), ("int8", "int8"))


class ExportPanel(QGroupBox):
    """Emits `export(out_dir, quantize)`; the window builds the job."""
    export = Signal(str, object)

    def __init__(self, parent=None):
        super().__init__("Export to ONNX", parent)
        self.setMinimumWidth(300)
        lay = QVBoxLayout(self)
        self.run_label = QLabel("Select a finished run in the table.")
        self.run_label.setWordWrap(True)
        lay.addWidget(self.run_label)
        self.quantize = QComboBox()
        for text, value in QUANTIZE:
            self.quantize.addItem(text, value)
        self.quantize.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.quantize.setToolTip("fp32: the variant as is; int8: quantized for onnxruntime, then verified")
        self.out = QLineEdit()
        self.out.setPlaceholderText("default: workspace/exports/…")
        self.out.setToolTip("An empty or new folder for model.onnx")
        browse = QToolButton()
        browse.setText("…")
        browse.clicked.connect(self._pick)
        form = QFormLayout()
        form.addRow("weights", self.quantize)
        row = QHBoxLayout()
        row.addWidget(self.out, 1)
        row.addWidget(browse)
        form.addRow("folder", row)
        lay.addLayout(form)
        self.button = QPushButton("Export && verify")
        self.button.setEnabled(False)
        self.button.clicked.connect(self._export_clicked)
        lay.addWidget(self.button)
        self.numbers = QLabel()
        self.numbers.setWordWrap(True)
        self.numbers.setTextInteractionFlags(Qt.TextSelectableByMouse)  # the path can be copied
        lay.addWidget(self.numbers)
        lay.addStretch(1)
        self.can_export = False

    def _export_clicked(self) -> None:
        self.export.emit(self.out.text().strip(), self.quantize.currentData())

    def _pick(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Export into a new folder under…")
        if d:
            self.out.setText(str(Path(d) / "onnx"))

    def show_run(self, row: dict | None, export: dict | None, busy: bool) -> None:
        """`row`: the selected table row; `export`: the ledger row of its latest export."""
        self.can_export = bool(row and row["status"] == "done")
        self.button.setEnabled(self.can_export and not busy)
        if not row:
            self.run_label.setText("Select a finished run in the table.")
        else:
            self.run_label.setText(f"<b>{html.escape(row['label'])}</b>"
                                   + ("" if self.can_export else f" — {row['status']}, nothing to export"))
        self.numbers.setText(describe(export) if export else "")


def describe(e: dict) -> str:
    """HTML: the verified numbers of an export run (or why it failed)."""
    q = ((e.get("settings") or {}).get("export") or {}).get("quantize") or "fp32"
    if e["status"] == "running":
        return f"Exporting ({q})…"
    if e["status"] != "done":
        return f"<span style='color:#c62828'>Export ({q}) {e['status']}: {html.escape(e.get('error') or '')}</span>"
    r = e.get("result") or {}
    ppl_o, ppl_t = r.get("ppl_onnx"), r.get("ppl_torch")
    delta = fmt_pct((ppl_o / ppl_t - 1) * 100) if ppl_o and ppl_t else ""
    head = (f"<span style='color:#2e7d32'><b>ONNX {q}: verified in onnxruntime</b></span>" if r.get("ok", True)
            else f"<span style='color:#c62828'><b>ONNX {q}: verification failed</b> — "
                 f"{html.escape(str(r.get('failure') or ''))}</span>")
    cells = "".join(
        f"<tr><td>{name}</td><td align=right>{o}</td><td align=right>{t}</td><td>{extra}</td></tr>"
        for name, o, t, extra in (
            ("perplexity", fmt_ppl(ppl_o), fmt_ppl(ppl_t), delta),
            ("decode tok/s", fmt_rate(r.get("decode_tokens_per_s_onnx")),
             fmt_rate(r.get("decode_tokens_per_s_torch")), ""),
            ("file MB", fmt_mb(r.get("size_bytes")), "", ""),
        ))
    return (f"{head}<table cellspacing=4><tr><th></th><th align=right>ONNX</th><th align=right>torch</th><th></th></tr>"
            f"{cells}</table><span style='color:gray'>{html.escape(str(r.get('path') or ''))}</span>")
