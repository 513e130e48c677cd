"""Weight views of one run's saved variant: a chosen Linear's weight histogram before (base
model, grey) and after (the variant, blue) on the same bins — a pruning spike at zero or the
quantization grid shows — the use of each integer code for packed low-bit weights, and bits per
weight and sparsity per layer as bar charts."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget


class WeightView(QWidget):
    """Emits `load(run_id)`; the window runs the weights job and calls show_result."""
    load = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        top = QHBoxLayout()
        top.addWidget(QLabel("run"))
        self.run = QComboBox()
        top.addWidget(self.run, 1)
        self.button = QPushButton("Load weights")
        self.button.clicked.connect(lambda: self.run.currentData() and self.load.emit(self.run.currentData()))
        top.addWidget(self.button)
        top.addWidget(QLabel("layer"))
        self.layer = QComboBox()
        self.layer.currentIndexChanged.connect(self._show_layer)
        top.addWidget(self.layer, 1)
        lay.addLayout(top)
        plots = QHBoxLayout()
        self.hist = pg.PlotWidget(background="w", title="weights: before (grey) / after (blue)")
        self.codes = pg.PlotWidget(background="w", title="integer codes used")
        plots.addWidget(self.hist, 3)
        plots.addWidget(self.codes, 2)
        lay.addLayout(plots, 3)
        self.per_layer = pg.PlotWidget(background="w", title="per layer: bits per weight (blue), sparsity % (orange)")
        lay.addWidget(self.per_layer, 2)
        self.note = QLabel()
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
        p = self.per_layer
        p.clear()
        layers = self.result["layers"]
        x = np.arange(len(layers))
        bits = [lay["bits"] or 0 for lay in layers]
        sparsity = [100 * (lay["sparsity_after"] or 0) for lay in layers]
        p.addItem(pg.BarGraphItem(x=x - 0.2, height=bits, width=0.4, brush="#1e88e5"))
        p.addItem(pg.BarGraphItem(x=x + 0.2, height=sparsity, width=0.4, brush="#fb8c00"))
        p.getAxis("bottom").setTicks([[(i, lay["name"].split(".layers.")[-1]) for i, lay in enumerate(layers)][::7]])

    def _show_layer(self, *_) -> None:
        if not self.result or self.layer.currentIndex() < 0:
            return
        lay = self.result["layers"][self.layer.currentIndex()]
        self.hist.clear()
        edges = np.array(lay["edges"])
        self.hist.addItem(pg.PlotDataItem(edges, lay["before"], stepMode="center", fillLevel=0,
                                          brush=(150, 150, 150, 120), pen="#888"))
        if lay["after"] is not None:
            self.hist.addItem(pg.PlotDataItem(edges, lay["after"], stepMode="center", pen=pg.mkPen("#1e88e5", width=2)))
        self.codes.clear()
        if lay.get("codes"):
            self.codes.addItem(pg.BarGraphItem(x=np.arange(len(lay["codes"])), height=lay["codes"], width=0.8,
                                               brush="#43a047"))
        bits = "removed by the recipe" if lay["after"] is None else f"{lay['bits']:.2f} bits/weight"
        sp = "" if lay["sparsity_after"] is None else f", {lay['sparsity_after'] * 100:.1f} % zeros"
        self.note.setText(f"{lay['name']}: {lay['shape_before'][0]}×{lay['shape_before'][1]}, {bits}{sp}"
                          + ("" if lay.get("codes") else " (no packed integer codes: float or pruned weights)"))
