"""Export the selected run to ONNX: target (fp32 / CPU int8 / CPU int4) and opset, a size and
time estimate before starting, then the verified numbers of its latest export: perplexity,
prefill and decode speed in onnxruntime next to torch's, the share of the memory-bandwidth
bound, greedy-generation parity, file size; a failed verification in red."""
from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QFrame, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
                               QPushButton, QScrollArea, QSizePolicy, QToolButton, QVBoxLayout, QWidget)

from core.evaluate import EvalSettings
from core.export.estimate import estimate
from core.results import fmt_duration, fmt_mb, fmt_pct, fmt_ppl, fmt_rate
from gui.widgets.layout import narrow

QUANTIZE = (("fp32 (lossless)", None), ("int8 (weight-only)", "int8"), ("int4 (the variant's codes)", "int4"))
QUANTIZE_TIPS = {
    None: "The variant as it is, in float32: must match torch's perplexity and greedy output.",
    "int8": "8-bit weights in onnxruntime's MatMulNBits (embedding and LM head too); each path verified.",
    "int4": "4-bit MatMulNBits written from the variant's own gptq / awq / rtn codes (so their quality is "
            "kept); a float variant is re-quantized by RTN and the result says so.",
}
OPSETS = (("auto", None), ("14", 14), ("17", 17), ("18", 18))
GRAPHS = (("onnxruntime (fused, fastest)", "fused"), ("portable (standard ONNX ops)", "portable"))
GRAPH_TIPS = {
    "fused": "Attention, rotary and the KV cache append as onnxruntime's GroupQueryAttention, residual + RMSNorm "
             "fused: decodes faster in onnxruntime. Llama models; others get the portable graph and the "
             "result says why.",
    "portable": "optimum-onnx's traced graph with standard ONNX ops only: for runtimes other than onnxruntime.",
}


class ExportPanel(QGroupBox):
    """Emits `export(out_dir, quantize, opset, graph)`; the window builds the job."""
    export = Signal(str, object, object, str)

    def __init__(self, parent=None):
        super().__init__("Export to ONNX", parent)
        self.setMinimumWidth(250)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()  # the verified numbers run taller than the panel on a small screen
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)  # the body narrows to fit; never a sideways scroll
        outer.addWidget(scroll)
        body = QWidget()
        scroll.setWidget(body)
        lay = QVBoxLayout(body)
        self.run_label = QLabel("Select a finished run in the table.")
        self.run_label.setWordWrap(True)
        lay.addWidget(self.run_label)
        self.quantize = QComboBox()
        for text, value in QUANTIZE:
            self.quantize.addItem(text, value)
        self.quantize.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        for i, (_, value) in enumerate(QUANTIZE):
            self.quantize.setItemData(i, QUANTIZE_TIPS[value], Qt.ToolTipRole)
        self.quantize.currentIndexChanged.connect(self._update_estimate)
        self.opset = QComboBox()
        for text, value in OPSETS:
            self.opset.addItem(text, value)
        self.opset.setToolTip("ONNX opset; auto = 17 for the fused graph, what optimum-onnx picks for the "
                              "portable one")
        self.graph = QComboBox()
        for i, (text, value) in enumerate(GRAPHS):
            self.graph.addItem(text, value)
            self.graph.setItemData(i, GRAPH_TIPS[value], Qt.ToolTipRole)
        self.out = QLineEdit()
        self.out.setPlaceholderText("default: workspace/exports/…")
        self.out.setToolTip("A new or empty folder for model.onnx (a name alone goes under workspace/exports), "
                            "or an earlier export's folder: the new export replaces it and its row is marked replaced")
        browse = QToolButton()
        browse.setText("…")
        browse.clicked.connect(self._pick)
        narrow(self.quantize, self.graph, self.opset, chars=8)  # their longest item must not set the panel's width
        form = QFormLayout()
        form.setRowWrapPolicy(QFormLayout.WrapLongRows)
        form.addRow("target", self.quantize)
        form.addRow("graph", self.graph)
        form.addRow("opset", self.opset)
        row = QHBoxLayout()
        row.addWidget(self.out, 1)
        row.addWidget(browse)
        form.addRow("folder", row)
        lay.addLayout(form)
        self.estimate = QLabel()
        self.estimate.setStyleSheet("color: gray")
        self.estimate.setWordWrap(True)
        lay.addWidget(self.estimate)
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
        self.row: dict | None = None

    def _export_clicked(self) -> None:
        self.export.emit(self.out.text().strip(), self.quantize.currentData(), self.opset.currentData(),
                         self.graph.currentData())

    def _update_estimate(self, *_) -> None:
        r = self.row
        if not (self.can_export and r and r.get("params")):
            self.estimate.setText("")
            return
        settings = EvalSettings(**{k: v for k, v in (r.get("eval") or {}).items()
                                   if k in EvalSettings.__dataclass_fields__})
        e = estimate(r["params"], self.quantize.currentData(), settings, r.get("prefill_tokens_per_s"),
                     r.get("decode_tokens_per_s"))
        self.estimate.setText(f"estimate: ≈ {fmt_mb(e['size_bytes'])} MB, ≈ {fmt_duration(e['seconds'])}"
                              " (export + verification)")

    def _pick(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Export into a new folder under…")
        if d:
            self.out.setText(str(Path(d) / "onnx"))

    def show_run(self, row: dict | None, export: dict | None, busy: bool) -> None:
        """`row`: the selected table row; `export`: the ledger row of its latest export."""
        self.row = row
        self.can_export = bool(row and row["status"] == "done" and not row.get("export"))
        self.button.setEnabled(self.can_export and not busy)
        self._update_estimate()
        if not row:
            self.run_label.setText("Select a finished run in the table.")
        elif row.get("export"):
            self.run_label.setText(f"<b>{html.escape(row['label'])}</b>")
        else:
            why = (f"<br><span style='color:#c62828'>{html.escape(str(row['error']))}</span>"
                   if not self.can_export and row.get("error") else "")  # what went wrong, where the eye is
            self.run_label.setText(f"<b>{html.escape(row['label'])}</b>"
                                   + ("" if self.can_export else f" — {row['status']}, nothing to export") + why)
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
    frac = r.get("roofline_fraction")
    bound = (f"{frac * 100:.0f} % of the {fmt_rate(r['roofline_tokens_per_s'])} tok/s memory bound"
             if frac is not None and r.get("roofline_tokens_per_s") else "")
    match = r.get("generation_match")
    gen = ("" if match is None else f"{round(match * len(r.get('generation_first_diff') or [1]))}/"
           f"{len(r.get('generation_first_diff') or [1])} prompts identical")
    cells = "".join(
        f"<tr><td>{name}</td><td align=right>{o}</td><td align=right>{t}</td><td>{extra}</td></tr>"
        for name, o, t, extra in (
            ("perplexity", fmt_ppl(ppl_o), fmt_ppl(ppl_t), delta),
            ("decode tok/s", fmt_rate(r.get("decode_tokens_per_s_onnx")),
             fmt_rate(r.get("decode_tokens_per_s_torch")), ""),
            ("prefill tok/s", fmt_rate(r.get("prefill_tokens_per_s_onnx")),
             fmt_rate(r.get("prefill_tokens_per_s_torch")), ""),
            ("greedy, 8 tokens", gen, "", ""),
            ("file MB", fmt_mb(r.get("size_bytes")), "", f"{r['size_bytes'] / r['fp32_size_bytes']:.2f}× fp32"
             if r.get("size_bytes") and r.get("fp32_size_bytes") and q != "fp32" else ""),
        ))
    if bound:  # a sentence under the table: in a fourth column it wrapped into a tall cell
        bound = f"decode at {bound}<br>"
    path = f"<br>path: {html.escape(r['quant_path'])}" if r.get("quant_path") else ""
    if r.get("graph"):
        path += f"<br>graph: {html.escape(r['graph'])}" + (f" — {html.escape(r['graph_note'])}"
                                                          if r.get("graph_note") else "")
    if r.get("note"):
        path += f"<br>{html.escape(r['note'])}"
    return (f"{head}<table cellspacing=4><tr><th></th><th align=right>ONNX</th><th align=right>torch</th><th></th></tr>"
            f"{cells}</table>{bound}<span style='color:gray'>{html.escape(str(r.get('path') or ''))}{path}</span>")
