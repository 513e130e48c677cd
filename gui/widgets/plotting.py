"""Plot set-up shared by the views: pyqtgraph axes that are cheap to repaint in software rendering."""
from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtWidgets import QGraphicsItem


def lean_axes(plot: pg.PlotItem, text: str = "#333", line: str = "#888") -> pg.PlotItem:
    """Major ticks only, each axis cached as a pixmap until its ticks change, no context menu: a
    full tick grid cost ~15-25 ms per repaint, enough to stall the event loop on a slow 2-core CPU."""
    plot.setMenuEnabled(False)
    for side in ("left", "bottom"):
        axis = plot.getAxis(side)
        axis.setTextPen(text)
        axis.setPen(line)
        axis.enableAutoSIPrefix(False)  # MB stay MB, not "×0.001"
        axis.setStyle(maxTickLevel=0)
        axis.setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
    return plot
