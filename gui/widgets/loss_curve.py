"""A live curve of a job's numeric series ("metric" events: distill's loss per step), drawn with
QPainter; hidden until the first point of a job arrives."""
from __future__ import annotations

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QPainter, QPainterPath, QPalette, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget


class LossCurve(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.name = ""
        self.points: list[tuple[int, float]] = []
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setVisible(False)

    def clear(self) -> None:
        self.points, self.name = [], ""
        self.setVisible(False)
        self.update()

    def add(self, e: dict) -> None:
        """One "metric" event: {"name", "step", "value"}."""
        try:
            step, value = int(e["step"]), float(e["value"])
        except (KeyError, TypeError, ValueError):
            return
        if e.get("name") != self.name:
            self.points, self.name = [], str(e.get("name", ""))
        self.points.append((step, value))
        self.setToolTip(f"{self.name}: step {step}, {short(value)}")
        self.setVisible(True)
        self.update()

    def paintEvent(self, _ev) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        pal = self.palette()
        text = pal.color(QPalette.Text)
        fm = p.fontMetrics()
        line = fm.height()
        ys = [v for _, v in self.points]
        y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if y1 - y0 < 1e-12:
            y0, y1 = y0 - 0.5, y1 + 0.5
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad
        if ys and min(ys) >= 0:  # a loss: the axis does not dip below zero
            y0 = max(0.0, y0)
        labels = [short(y1), short(y0)]
        left = max(fm.horizontalAdvance(t) for t in labels) + 8  # the y labels fit, whatever their size
        r = QRectF(self.rect()).adjusted(left, line + 2, -10, -(line + 4))
        p.setPen(QPen(pal.color(QPalette.Mid), 1))
        p.drawRect(r)
        title = f"{self.name.replace('_', ' ')}" + (f" — step {self.points[-1][0]}: {short(self.points[-1][1])}"
                                                   if self.points else "")
        p.setPen(text)
        p.drawText(QRectF(left, 0, self.width() - left - 10, line), Qt.AlignLeft | Qt.AlignVCenter, title)
        if not self.points:
            return
        xs = [s for s, _ in self.points]
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)

        def at(s, v):
            return QPointF(r.left() + (s - x0) / (x1 - x0) * r.width(),
                           r.bottom() - (v - y0) / (y1 - y0) * r.height())

        for label, y in zip(labels, (r.top(), r.bottom())):
            p.drawText(QRectF(0, y - line / 2, left - 4, line), Qt.AlignRight | Qt.AlignVCenter, label)
        below = QRectF(r.left(), r.bottom() + 2, r.width(), line)
        p.drawText(below, Qt.AlignLeft, str(x0))
        p.drawText(below, Qt.AlignHCenter, "step")
        p.drawText(below, Qt.AlignRight, str(x1))
        path = QPainterPath(at(*self.points[0]))
        for s, v in self.points[1:]:
            path.lineTo(at(s, v))
        p.setPen(QPen(QColor("#1e88e5"), 2))
        p.drawPath(path)
        p.end()


def short(v: float) -> str:
    """A loss value in a few characters: 2.31, 0.0412, 3.9e-06."""
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.1e}"
