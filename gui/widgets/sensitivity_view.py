"""The sensitivity map: Δ perplexity when one technique is applied to one Linear alone, as a heat
map of layers × module types. Hovering a cell shows its number; clicking it excludes that Linear
from the technique in the recipe (the technique panel's `exclude` field), so the recipe view
updates at once. After an rtn scan, a size-budget slider proposes mixed precision (which Linears
keep 8 bits, core.mixed_precision) live, and one button puts it in the recipe and runs it."""
from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QHBoxLayout, QLabel, QPushButton, QSizePolicy, QSlider,
                               QSpinBox, QWidget)

from core.errors import SqueezeError
from core.mixed_precision import allocate, size_range, summary
from core.results import fmt_duration
from core.sensitivity import module_path
from gui.widgets.layout import scrolling_body
from gui.widgets.plotting import lean_axes, theme_plot

SETTINGS = {"rtn": ("bits", 2, 8, 1, 4, 0), "magnitude_prune": ("sparsity", 0.05, 0.95, 0.05, 0.5, 2)}
SUFFIX = {"bits": " bits", "sparsity": " sparsity"}


class SensitivityView(QWidget):
    """Emits `scan(technique, setting, max_tokens)`, `exclude(technique, setting, module path)` and
    `mixed(allocation)` (core.mixed_precision.allocate's dict, to put in the recipe and run)."""
    scan = Signal(str, float, int)
    exclude = Signal(str, float, str)
    mixed = Signal(object)  # an allocation dict, passed as it is

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = scrolling_body(self)
        top = QHBoxLayout()
        self.technique = QComboBox()
        for name in SETTINGS:
            self.technique.addItem(name, name)
        self.technique.currentIndexChanged.connect(self._setting_range)
        self.setting = QDoubleSpinBox()
        self.tokens = QSpinBox()
        self.tokens.setRange(256, 65536)
        self.tokens.setSingleStep(1024)
        self.tokens.setValue(4096)
        self.tokens.setSuffix(" tokens")
        self.button = QPushButton("Scan every layer")
        self.button.clicked.connect(lambda: self.scan.emit(self.technique.currentData(), self.setting.value(),
                                                           self.tokens.value()))
        # short rows: one long row set the whole window's minimum width (the view scrolls up and down instead)
        for w in (QLabel("technique"), self.technique):
            top.addWidget(w)
        top.addStretch(1)
        lay.addLayout(top)
        second = QHBoxLayout()
        for w in (QLabel("setting"), self.setting, QLabel("on"), self.tokens):
            second.addWidget(w)
        second.addStretch(1)
        lay.addLayout(second)
        third = QHBoxLayout()
        third.addWidget(self.button)
        third.addStretch(1)
        lay.addLayout(third)
        self.plot = pg.PlotWidget(background="w")
        self.plot.setMinimumHeight(150)  # a map of 30 layers stays readable; a short pane scrolls instead
        self.plot.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Ignored)  # (its size hint would make it scroll)
        lean_axes(self.plot.getPlotItem())
        self.plot.getPlotItem().hideAxis("left")  # shown with the first map (empty, they read ±0.5)
        self.plot.getPlotItem().hideAxis("bottom")
        self.plot.setMouseEnabled(False, False)
        self.plot.getPlotItem().setMenuEnabled(False)
        self.image = pg.ImageItem()
        self.plot.addItem(self.image)
        # built now, not when the first scan arrives (~30 ms on the GUI thread while a job finishes)
        self.bar = pg.ColorBarItem(values=(0, 1), colorMap=pg.colormap.get("inferno"), interactive=False)
        self.bar.setImageItem(self.image, insert_in=self.plot.getPlotItem())
        self.plot.scene().sigMouseMoved.connect(self._hover)
        self.plot.scene().sigMouseClicked.connect(self._click)
        lay.addWidget(self.plot, 1)
        self.hint = QLabel("Scan to see which layers hurt: each cell is the perplexity change (%) when only that "
                           "Linear is compressed. Click a cell to keep that Linear out of the recipe.")
        self.hint.setWordWrap(True)
        lay.addWidget(self.hint)
        mp = QHBoxLayout()  # mixed precision for a size budget (rtn scans)
        self.budget_slider = QSlider(Qt.Orientation.Horizontal)
        self.budget_slider.setRange(0, 1000)
        self.budget = QDoubleSpinBox()
        self.budget.setSuffix(" MB")
        self.budget.setDecimals(1)
        self.budget_slider.valueChanged.connect(self._slid)
        self.budget.valueChanged.connect(self._budget_changed)
        self.mixed_button = QPushButton("Mixed precision: run")
        self.mixed_button.setToolTip("Put this allocation in the recipe (rtn, the most sensitive Linears at 8 bits) "
                                     "and run it")
        self.mixed_button.clicked.connect(self._mixed_clicked)
        for w in (QLabel("size budget"), self.budget_slider, self.budget):
            mp.addWidget(w)
        mp.setStretch(1, 1)
        lay.addLayout(mp)
        go = QHBoxLayout()
        go.addWidget(self.mixed_button)
        go.addStretch(1)
        lay.addLayout(go)
        self.proposal = QLabel("")
        self.proposal.setWordWrap(True)
        lay.addWidget(self.proposal)
        self.allocation: dict | None = None
        self.result: dict | None = None
        self._mixed_enabled(False)
        self._setting_range()

    def set_dark(self, dark: bool) -> None:
        theme_plot(self.plot, dark)

    def _setting_range(self, *_) -> None:
        what, lo, hi, step, default, decimals = SETTINGS[self.technique.currentData()]
        self.setting.setSuffix(SUFFIX[what])
        self.setting.setDecimals(decimals)
        self.setting.setRange(lo, hi)
        self.setting.setSingleStep(step)
        self.setting.setValue(default)

    def show_result(self, r: dict) -> None:
        self.result = r
        d = np.array([[np.nan if v is None else v for v in row] for row in r["delta_pct"]], dtype=float)  # (L, 7)
        finite = d[np.isfinite(d)]
        hi = max(float(finite.max()) if finite.size else 1.0, 1e-6)
        self.image.setImage(d.T, levels=(0, hi))            # x = module, y = layer
        self.image.setColorMap(pg.colormap.get("inferno"))
        pi = self.plot.getPlotItem()
        for side in ("left", "bottom"):
            pi.showAxis(side)
        pi.getAxis("bottom").setTicks([[(k + 0.5, m.replace("_proj", "")) for k, m in enumerate(r["modules"])]])
        pi.getAxis("left").setTicks([[(i + 0.5, str(i)) for i in range(0, r["layers"], max(1, r["layers"] // 10))]])
        pi.setLabel("left", "layer")
        pi.setTitle(f"Δ perplexity % — {r['technique']} {r['setting']:g}, one Linear at a time")
        # the whole map, every module column: auto-range left the last column outside the view
        pi.setRange(xRange=(0, len(r["modules"])), yRange=(0, r["layers"]), padding=0)
        self.bar.setLevels((0, hi))
        self._offer_mixed(r)
        worst = np.unravel_index(np.nanargmax(d), d.shape) if finite.size else None
        if worst is not None:
            self.hint.setText(f"Most sensitive: layer {worst[0]} {r['modules'][worst[1]]} "
                              f"(+{d[worst]:.2f} %). Click a cell to keep that Linear out of the recipe. "
                              f"Base perplexity {r['base_ppl']:.3g} on {r['tokens']:,} tokens, "
                              f"{r.get('precision', 'fp32')}, scanned in {fmt_duration(r['seconds'])}.")

    # -- mixed precision ---------------------------------------------------------------------------
    def _mixed_enabled(self, on: bool) -> None:
        for w in (self.budget_slider, self.budget, self.mixed_button):
            w.setEnabled(on)
        if not on:
            self.allocation = None
            self.proposal.setText("Mixed precision from sensitivity: scan with rtn (4 bits, say), then pick a "
                                  "size budget; the Linears that hurt most per byte keep 8 bits.")

    def _offer_mixed(self, r: dict) -> None:
        ok = r.get("technique") == "rtn" and int(r.get("setting", 8)) < 8 and "shapes" in r
        self._mixed_enabled(ok)
        if not ok:
            return
        low, high = (v / 1e6 for v in size_range(r))
        dec = 1 if high >= 50 else 3  # MB shown to 0.1 for real models, finer for tiny ones
        q = 10 ** dec
        lo, hi = math.ceil(low * q) / q, max(math.floor(high * q) / q, math.ceil(low * q) / q)
        self.budget.blockSignals(True)
        self.budget.setDecimals(dec)
        self.budget.setRange(lo, hi)
        self.budget.setSingleStep(max((hi - lo) / 50, 1 / q))
        self.budget.blockSignals(False)
        self.budget.setValue(lo + 0.25 * (hi - lo))  # a quarter of the way: a sensible first offer

    def _slid(self, v: int) -> None:
        lo, hi = self.budget.minimum(), self.budget.maximum()
        self.budget.setValue(lo + (hi - lo) * v / 1000)

    def _budget_changed(self, mb: float) -> None:
        lo, hi = self.budget.minimum(), self.budget.maximum()
        self.budget_slider.blockSignals(True)
        self.budget_slider.setValue(round(1000 * (mb - lo) / (hi - lo)) if hi > lo else 0)
        self.budget_slider.blockSignals(False)
        try:
            self.allocation = allocate(self.result, mb)
            self.proposal.setText(summary(self.allocation))
        except SqueezeError as e:
            self.allocation = None
            self.proposal.setText(str(e))

    def _mixed_clicked(self) -> None:
        if self.allocation:
            self.mixed.emit(self.allocation)

    def cell_at(self, scene_pos) -> tuple[int, str] | None:
        if not self.result:
            return None
        p = self.plot.getPlotItem().vb.mapSceneToView(scene_pos)
        k, i = int(np.floor(p.x())), int(np.floor(p.y()))
        if 0 <= k < len(self.result["modules"]) and 0 <= i < self.result["layers"]:
            return i, self.result["modules"][k]
        return None

    def value(self, i: int, module: str):
        return self.result["delta_pct"][i][self.result["modules"].index(module)]

    def _hover(self, pos) -> None:
        cell = self.cell_at(pos)
        if cell:
            v = self.value(*cell)
            self.plot.setToolTip(f"layer {cell[0]} {cell[1]}: " + ("—" if v is None else f"{v:+.2f} % perplexity"))

    def _click(self, ev) -> None:
        cell = self.cell_at(ev.scenePos())
        if cell and self.result:
            self.exclude.emit(self.result["technique"], float(self.result["setting"]), module_path(*cell))
