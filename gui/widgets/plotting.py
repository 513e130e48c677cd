"""Plot set-up shared by the views: pyqtgraph axes that are cheap to repaint in software rendering."""
from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtGui import QFontMetrics
from PySide6.QtWidgets import QApplication, QGraphicsItem

WIDEST_TICK = "-00.000"  # the widest tick label the views show (counts, MB, perplexity, weight values)
SIDES = ("left", "bottom", "right")  # the right axis shows only where a view has a second scale


def lean_axes(plot: pg.PlotItem, text: str = "#333", line: str = "#888") -> pg.PlotItem:
    """Major ticks only, each axis cached as a pixmap until its ticks change, no context menu: a
    full tick grid cost ~15-25 ms per repaint, enough to stall the event loop on a slow 2-core CPU."""
    plot.setMenuEnabled(False)
    for side in SIDES:
        axis = plot.getAxis(side)
        axis.setTextPen(text)
        axis.setPen(line)
        axis.enableAutoSIPrefix(False)  # MB stay MB, not "×0.001"
        axis.setStyle(maxTickLevel=0)
        axis.setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
        fixed_text_space(axis)
    return plot


def fixed_text_space(axis: pg.AxisItem, font=None) -> None:
    """Room for tick labels sized once from the font, not from the labels drawn: otherwise each
    repaint with new data whose labels are wider or narrower resizes the axis, re-lays out the plot
    and paints it again (three extra repaints of the weight view, ~10 ms on a slow CPU)."""
    fm = QFontMetrics(font or axis.style.get("tickFont") or QApplication.font())
    axis.setStyle(autoExpandTextSpace=False, tickTextWidth=fm.horizontalAdvance(WIDEST_TICK),
                  tickTextHeight=fm.height())


PLOT_COLOURS = {False: ("w", "#333", "#888"), True: ("#1e1f22", "#dfe1e5", "#8c8f94")}  # background, text, lines


def theme_plot(widget: pg.PlotWidget, dark: bool) -> None:
    """A plot's background, axes and title in the app's light or dark palette."""
    background, text, line = PLOT_COLOURS[dark]
    widget.setBackground(background)
    pi = widget.getPlotItem()
    for side in SIDES:
        axis = pi.getAxis(side)
        axis.setTextPen(text)
        axis.setPen(line)
        if axis.label.toPlainText():  # axis titles keep their colour otherwise
            axis.setLabel(axis.labelText, units=axis.labelUnits, color=text)
    pi.titleLabel.opts["color"] = text
    if pi.titleLabel.text:
        pi.titleLabel.setText(pi.titleLabel.text)


def font_plot(widget: pg.PlotWidget, font) -> None:
    """Ticks, axis titles and the title in `font` (teaching mode's larger fonts reach the plots too)."""
    pi = widget.getPlotItem()
    for side in SIDES:
        axis = pi.getAxis(side)
        axis.setStyle(tickFont=font)
        fixed_text_space(axis, font)
        axis.label.setFont(font)
        axis.picture = None  # re-measure the tick labels
        axis.update()
    pi.titleLabel.opts["size"] = f"{font.pointSizeF():.0f}pt"
    if pi.titleLabel.text:
        pi.titleLabel.setText(pi.titleLabel.text)
