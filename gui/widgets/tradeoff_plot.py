"""The trade-off plot: perplexity against size on disk or decode speed (switchable), the
baseline as a star, the Pareto front as a line. Clicking a point emits its run id; `select`
rings a point (the table's selection)."""
from __future__ import annotations

import math
from functools import partial

import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QButtonGroup, QHBoxLayout, QLabel, QRadioButton, QVBoxLayout, QWidget

from core.results import trade_off
from gui.widgets.plotting import lean_axes, theme_plot

X_TITLES = {"size": "size on disk (MB) — smaller is better", "decode": "decode tokens/s — more is better"}
RUN_BRUSH, BASE_BRUSH, FRONT_PEN = pg.mkBrush("#1e88e5"), pg.mkBrush("#fb8c00"), pg.mkPen("#43a047", width=2)
EXPORT_BRUSH = pg.mkBrush("#8e24aa")  # ONNX exports: onnxruntime's speed, not on the (torch) front


class PlainLogAxis(pg.AxisItem):
    """A log axis labelled 30, 100, 300 rather than 3·10¹."""

    def logTickStrings(self, values, scale, spacing):
        # many ticks in a short axis (20, 30 … 90, 100) ran into one block: then only 1, 2, 5 × 10^n are labelled
        crowded = len(values) > 6
        return [f"{10 ** v:.4g}" if not crowded or f"{10 ** v:.0e}"[0] in "125" else "" for v in values]


class TradeoffPlot(QWidget):
    point_clicked = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.axis = "size"
        self.rows: list[dict] = []
        self.eval_key: str | None = None
        self.points: list[dict] = []
        self.front: list[str] = []
        self.selected: str = ""
        self.log_y = False

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        bar = QHBoxLayout()
        bar.addWidget(QLabel("perplexity vs"))
        self.buttons = QButtonGroup(self)
        for key, text in (("size", "size"), ("decode", "decode speed")):
            b = QRadioButton(text)
            b.setChecked(key == self.axis)
            b.toggled.connect(partial(self._axis_toggled, key))
            self.buttons.addButton(b)
            bar.addWidget(b)
            setattr(self, f"{key}_button", b)
        bar.addStretch(1)
        self.legend_label = QLabel(
            "<span style='color:#fb8c00'>★</span> baseline &nbsp; <span style='color:#1e88e5'>●</span> run"
            " &nbsp; <span style='color:#8e24aa'>◆</span> ONNX export"
            " &nbsp; <span style='color:#43a047'>━</span> Pareto front")
        self.legend_label.setToolTip("ONNX exports are measured in onnxruntime: their decode speed is not torch's, "
                                     "so they are drawn apart and left off the Pareto front of the runs")
        self.legend_label.setWordWrap(True)
        lay.addLayout(bar)

        self.view = pg.PlotWidget(background="w", axisItems={"left": PlainLogAxis("left")})
        self.view.setMinimumHeight(200)
        pi = self.view.getPlotItem()
        pi.showGrid(x=True, y=True, alpha=0.25)
        pi.setLabel("left", "perplexity — lower is better")
        lean_axes(pi)  # grid lines on major ticks only
        self.front_line = pg.PlotDataItem(pen=FRONT_PEN)
        self.scatter = pg.PlotDataItem(pen=None)
        self.scatter.sigPointsClicked.connect(self._clicked)
        # hovering a point names its recipe
        self.scatter.scatter.opts.update(hoverable=True, tip=self._tip)
        self.ring = pg.PlotDataItem(pen=None, symbol="o", symbolSize=22, symbolBrush=None,
                                    symbolPen=pg.mkPen("#d81b60", width=3))
        self.ring_text = pg.TextItem(color="#d81b60", anchor=(0, 1))
        for item in (self.front_line, self.scatter, self.ring):
            pi.addItem(item)
        pi.addItem(self.ring_text, ignoreBounds=True)
        self.empty_text = pg.TextItem("no measured runs yet", color="#888", anchor=(0.5, 0.5))
        self.empty_text.setTextWidth(240)  # wrapped: a narrow plot cut the longer hint at both sides
        self.empty_text.setPos(0.5, 0.5)
        pi.addItem(self.empty_text, ignoreBounds=True)
        lay.addWidget(self.view, 1)
        lay.addWidget(self.legend_label)  # under the plot: beside the axis switch it set the panel's minimum width
        self._redraw()

    def set_dark(self, dark: bool) -> None:
        """Plot colours for the app's light or dark palette."""
        theme_plot(self.view, dark)

    def set_rows(self, rows: list[dict], eval_key: str | None) -> None:
        """Table rows (core.results.table_rows); only runs of `eval_key` are comparable."""
        self.rows, self.eval_key = rows, eval_key
        self._redraw()

    def set_axis(self, axis: str) -> None:
        self.axis = axis
        getattr(self, f"{axis}_button").setChecked(True)
        self._redraw()

    def _axis_toggled(self, key: str, on: bool) -> None:
        if on:
            self.set_axis(key)

    def select(self, run_id: str) -> None:
        self.selected = run_id or ""
        self._draw_ring()

    def point_of(self, run_id: str) -> dict | None:
        return next((p for p in self.points if p["id"] == run_id), None)

    def _redraw(self) -> None:
        self.points, self.front = trade_off(self.rows, self.axis, self.eval_key)
        pts = self.points
        others = sum(1 for r in self.rows if r["status"] == "done" and r.get("eval_key") != self.eval_key)
        drawn = (repr(pts), tuple(self.front), self.axis, others)
        if drawn == getattr(self, "_drawn", None):  # e.g. a job started: nothing new to plot
            self._draw_ring()
            return
        self._drawn = drawn
        pi = self.view.getPlotItem()
        pi.setLabel("bottom", X_TITLES[self.axis])
        ys = [p["y"] for p in pts]
        # perplexities of broken variants run into the thousands: log scale keeps the good ones apart
        self.log_y = bool(ys) and max(ys) / min(ys) > 8
        pi.setLogMode(y=self.log_y)
        self.scatter.setData(
            [p["x"] for p in pts], ys, data=[p["id"] for p in pts],
            symbol=["star" if p["baseline"] else "d" if p["export"] else "o" for p in pts],
            symbolSize=[18 if p["baseline"] else 13 if p["export"] else 11 for p in pts],
            symbolBrush=[BASE_BRUSH if p["baseline"] else EXPORT_BRUSH if p["export"] else RUN_BRUSH for p in pts],
            symbolPen=[pg.mkPen("w") for _ in pts])
        by_id = {p["id"]: p for p in pts}
        self.front_line.setData([by_id[i]["x"] for i in self.front], [by_id[i]["y"] for i in self.front])
        self.empty_text.setText("no measured runs yet" if not others else
                                f"no runs under these eval settings ({others} under others, greyed in the table)")
        self.empty_text.setVisible(not pts)
        self._draw_ring()
        if pts:
            pi.enableAutoRange()
        else:  # the hint sits at (0.5, 0.5): show that square, not the range the last points left
            pi.disableAutoRange()
            pi.setRange(xRange=(0, 1), yRange=(0, 1), padding=0)

    def _draw_ring(self) -> None:
        p = self.point_of(self.selected)
        ring = (repr(p), self.log_y, getattr(self, "_drawn", None))  # (the label side follows all points)
        if ring == getattr(self, "_ringed", None):  # unchanged: re-setting costs ~10 ms of symbol rendering
            return
        self._ringed = ring
        if p is None:
            self.ring.setData([], [])
            self.ring_text.setText("")
            return
        self.ring.setData([p["x"]], [p["y"]])
        self.ring_text.setText(p["label"])
        xs = [q["x"] for q in self.points]
        right_half = p["x"] > (min(xs) + max(xs)) / 2
        self.ring_text.setAnchor((1.05, 1) if right_half else (-0.05, 1))  # keep the label inside the plot
        self.ring_text.setPos(p["x"], math.log10(p["y"]) if self.log_y else p["y"])

    def _tip(self, x, y, data) -> str:
        p = self.point_of(data)
        return f"{p['label']}\nppl {p['y']:.3f}" if p else ""

    def _clicked(self, item, points, ev=None) -> None:
        if len(points):
            self.point_clicked.emit(str(points[0].data()))
