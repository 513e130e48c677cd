"""Weight views of one run's saved variant: a chosen Linear's weight histogram before (base
model, grey) and after (the variant, blue) on the same bins — a pruning spike at zero or the
quantization grid shows — the use of each integer code for packed low-bit weights, and bits per
weight and sparsity per layer as bar charts."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton, QSizePolicy, QWidget

from core.weights import bin_edges
from gui.widgets.layout import narrow, scrolling_body
from gui.widgets.plotting import lean_axes, theme_plot


EMPTY_NOTE = ("Pick a finished run and press <b>Load weights</b>: its weights beside the base model's, the "
              "integer codes a quantized Linear uses, and bits per weight and zeros per Linear.")


class WeightView(QWidget):
    """Emits `load(run_id)`; the window runs the weights job and calls show_result."""
    load = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = scrolling_body(self)
        top = QHBoxLayout()
        top.addWidget(QLabel("run"))
        self.run = QComboBox()
        top.addWidget(self.run, 1)
        self.button = QPushButton("Load weights")
        self.button.clicked.connect(lambda: self.run.currentData() and self.load.emit(self.run.currentData()))
        top.addWidget(self.button)
        lay.addLayout(top)
        pick = QHBoxLayout()  # its own row: beside the run it set the window's minimum width at projector fonts
        pick.addWidget(QLabel("layer"))
        self.layer = QComboBox()
        self.layer.currentIndexChanged.connect(self._show_layer)
        pick.addWidget(self.layer, 1)
        lay.addLayout(pick)
        narrow(self.run, self.layer, chars=12)  # a long recipe or module name must not set the view's width
        plots = QHBoxLayout()
        # the plot items are made once and given new data (adding and removing items, and pyqtgraph's
        # auto-range repainting each plot a second time, cost ~60 ms of GUI thread on a slow CPU)
        self.hist = pg.PlotWidget(background="w", title="weights: before (grey) / after (blue)")
        self.codes = pg.PlotWidget(background="w", title="integer codes used")
        self.per_layer = pg.PlotWidget(background="w", title="per Linear: bits per weight (blue, left), zeros % "
                                                             "(orange, right)")
        for p, x, y in ((self.hist, "weight value", "count"), (self.codes, "code", "count"),
                        (self.per_layer, "decoder layer", "bits per weight")):
            lean_axes(p.getPlotItem())
            p.setLabel("bottom", x)
            p.setLabel("left", y)
            p.disableAutoRange()
        self.before = pg.PlotDataItem(stepMode="center", fillLevel=0, brush=(150, 150, 150, 120), pen="#888")
        self.after = pg.PlotDataItem(stepMode="center", pen=pg.mkPen("#1e88e5", width=2))
        self.code_bars = pg.BarGraphItem(x=[], height=[], width=0.8, brush="#43a047")
        self.bit_bars = pg.BarGraphItem(x=[], height=[], width=0.4, brush="#1e88e5")
        self.sparsity_bars = pg.BarGraphItem(x=[], height=[], width=0.4, brush="#fb8c00")
        for plot, items in ((self.hist, (self.before, self.after)), (self.codes, (self.code_bars,)),
                            (self.per_layer, (self.bit_bars,))):
            for item in items:
                plot.addItem(item)
        # zeros % on a scale of its own (right axis): beside 14-83 % the bits (2-8) were slivers on one axis
        pi = self.per_layer.getPlotItem()
        self.zeros_box = pg.ViewBox(enableMenu=False)
        self.zeros_box.disableAutoRange()
        pi.showAxis("right")
        pi.scene().addItem(self.zeros_box)
        pi.getAxis("right").linkToView(self.zeros_box)
        pi.getAxis("right").setLabel("zeros %")
        self.zeros_box.setXLink(pi)
        pi.vb.sigResized.connect(lambda: self.zeros_box.setGeometry(pi.vb.sceneBoundingRect()))
        self.zeros_box.addItem(self.sparsity_bars)
        lean_axes(pi)
        for p, height in ((self.hist, 150), (self.codes, 150), (self.per_layer, 130)):
            p.setMinimumHeight(height)  # a short pane scrolls instead of cutting titles and piling up ticks
            p.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Ignored)  # (their 576-line size hint made it scroll)
        plots.addWidget(self.hist, 3)
        plots.addWidget(self.codes, 2)
        lay.addLayout(plots, 3)
        lay.addWidget(self.per_layer, 2)
        self.note = QLabel(EMPTY_NOTE)
        self.note.setWordWrap(True)
        lay.addWidget(self.note)
        self.result: dict | None = None

    def set_rows(self, rows: list[dict]) -> None:
        listed = [(r["id"], r["label"]) for r in rows
                  if r["status"] == "done" and r.get("variant_dir") and not r.get("export")]
        if listed == getattr(self, "_listed", None):  # unchanged: no relayout of the combo box
            return
        self._listed = listed
        current = self.run.currentData()
        self.run.blockSignals(True)
        self.run.clear()
        for run_id, label in listed:
            self.run.addItem(label, run_id)
        i = self.run.findData(current)
        self.run.setCurrentIndex(i if i >= 0 else self.run.count() - 1)
        self.run.blockSignals(False)
        self.button.setEnabled(self.run.count() > 0)

    def set_dark(self, dark: bool) -> None:
        for p in (self.hist, self.codes, self.per_layer):
            theme_plot(p, dark)

    def show_result(self, r: dict) -> None:
        self.result = r
        self.layer.blockSignals(True)
        self.layer.clear()
        for lay in r["layers"]:
            self.layer.addItem(lay["name"] + ("  (removed)" if lay["after"] is None else ""), lay["name"])
        self.layer.blockSignals(False)
        self._per_layer()
        self._show_layer()

    def _per_layer(self) -> None:
        layers = self.result["layers"]
        x = np.arange(len(layers))
        bits = [lay["bits"] or 0 for lay in layers]
        sparsity = [100 * (lay["sparsity_after"] or 0) for lay in layers]
        self.bit_bars.setOpts(x=x - 0.2, height=bits)
        self.sparsity_bars.setOpts(x=x + 0.2, height=sparsity)
        self.per_layer.getAxis("bottom").setTicks([block_ticks([lay["name"] for lay in layers])])
        self.per_layer.setRange(xRange=(-0.6, len(layers) - 0.4), yRange=(0, max(bits + [1]) * 1.05), padding=0)
        self.zeros_box.setRange(yRange=(0, 100), padding=0)

    def _show_layer(self, *_) -> None:
        if not self.result or self.layer.currentIndex() < 0:
            return
        lay = self.result["layers"][self.layer.currentIndex()]
        edges = bin_edges(lay["limit"], len(lay["before"]))
        after = lay["after"] if lay["after"] is not None else []
        self.before.setData(edges, lay["before"])
        self.after.setData(edges if len(after) else [], after)
        self.hist.setRange(xRange=(edges[0], edges[-1]), yRange=(0, max(list(lay["before"]) + list(after) + [1]) * 1.05),
                           padding=0)
        codes = lay.get("codes") or []
        self.code_bars.setOpts(x=np.arange(len(codes)), height=codes)
        self.codes.setRange(xRange=(-0.6, max(len(codes), 1) - 0.4), yRange=(0, max(codes + [1]) * 1.05), padding=0)
        bits = "removed by the recipe" if lay["after"] is None else f"{lay['bits']:.2f} bits/weight"
        sp = "" if lay["sparsity_after"] is None else f", {lay['sparsity_after'] * 100:.1f} % zeros"
        self.note.setText(f"{lay['name']}: {lay['shape_before'][0]}×{lay['shape_before'][1]}, {bits}{sp}"
                          + ("" if lay.get("codes") else " (no packed integer codes: float or pruned weights)"))


def block_ticks(names: list[str], most: int = 16) -> list[tuple[int, str]]:
    """Ticks at the first Linear of each decoder layer ("model.layers.3.mlp.up_proj" -> 3), thinned to
    at most `most` labels; Linears outside the layers (the LM head) get their own name."""
    firsts, seen = [], set()
    for i, name in enumerate(names):
        parts = name.split(".layers.")
        label = parts[1].split(".")[0] if len(parts) > 1 else name.split(".")[-1]
        if label not in seen:
            seen.add(label)
            firsts.append((i, label))
    step = max(1, -(-len(firsts) // most))
    return firsts[::step]
