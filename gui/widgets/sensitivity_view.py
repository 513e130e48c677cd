"""The sensitivity map: Δ perplexity when one technique is applied to one Linear alone, as a heat
map of layers × module types. Hovering a cell shows its number; clicking it excludes that Linear
from the technique in the recipe (the technique panel's `exclude` field), so the recipe view
updates at once."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QHBoxLayout, QLabel, QPushButton, QSpinBox, QVBoxLayout, QWidget

SETTINGS = {"rtn": ("bits", 2, 8, 1, 4, 0), "magnitude_prune": ("sparsity", 0.05, 0.95, 0.05, 0.5, 2)}
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def module_path(layer: int, module: str) -> str:
    return f"layers.{layer}.{PARENT[module]}.{module}"


class SensitivityView(QWidget):
    """Emits `scan(technique, setting, max_tokens)` and `exclude(technique, setting, module path)`."""
    scan = Signal(str, float, int)
    exclude = Signal(str, float, str)

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
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
        for w in (QLabel("technique"), self.technique, QLabel("setting"), self.setting, self.tokens, self.button):
            top.addWidget(w)
        top.addStretch(1)
        lay.addLayout(top)
        self.plot = pg.PlotWidget(background="w")
        self.plot.setMouseEnabled(False, False)
        self.plot.getPlotItem().setMenuEnabled(False)
        self.image = pg.ImageItem()
        self.plot.addItem(self.image)
        self.bar = None
        self.plot.scene().sigMouseMoved.connect(self._hover)
        self.plot.scene().sigMouseClicked.connect(self._click)
        lay.addWidget(self.plot, 1)
        self.hint = QLabel("Scan to see which layers hurt: each cell is the perplexity change (%) when only that "
                           "Linear is compressed. Click a cell to keep that Linear out of the recipe.")
        self.hint.setWordWrap(True)
        lay.addWidget(self.hint)
        self.result: dict | None = None
        self._setting_range()

    def _setting_range(self, *_) -> None:
        _, lo, hi, step, default, decimals = SETTINGS[self.technique.currentData()]
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
        pi.getAxis("bottom").setTicks([[(k + 0.5, m.replace("_proj", "")) for k, m in enumerate(r["modules"])]])
        pi.getAxis("left").setTicks([[(i + 0.5, str(i)) for i in range(0, r["layers"], max(1, r["layers"] // 10))]])
        pi.setLabel("left", "layer")
        pi.setTitle(f"Δ perplexity % — {r['technique']} {r['setting']:g} on one Linear at a time "
                    f"(base {r['base_ppl']:.3g}, {r['tokens']:,} tokens, {r['seconds']:.0f} s)")
        if self.bar is None:
            self.bar = pg.ColorBarItem(values=(0, hi), colorMap=pg.colormap.get("inferno"), interactive=False)
            self.bar.setImageItem(self.image, insert_in=pi)
        else:
            self.bar.setLevels((0, hi))
        worst = np.unravel_index(np.nanargmax(d), d.shape) if finite.size else None
        if worst is not None:
            self.hint.setText(f"Most sensitive: layer {worst[0]} {r['modules'][worst[1]]} "
                              f"(+{d[worst]:.2f} %). Click a cell to keep that Linear out of the recipe.")

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
