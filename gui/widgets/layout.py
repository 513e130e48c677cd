"""Layout that holds at a projector's 1280x720 with larger fonts: a view whose content scrolls up and down when
its pane is short instead of squeezing its plots to a sliver, and combo boxes that do not size their panel by
their longest item."""
from __future__ import annotations

from PySide6.QtCore import QSize, Qt
from PySide6.QtWidgets import QComboBox, QFrame, QScrollArea, QVBoxLayout, QWidget


def narrow(*boxes: QComboBox, chars: int) -> None:
    """Each box as wide as `chars` characters at least, not as its longest item (the rest is elided)."""
    for box in boxes:
        box.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        box.setMinimumContentsLength(chars)


class _VerticalScroll(QScrollArea):
    """Scrolls vertically only: as wide as its content needs, as short as a few lines."""

    def minimumSizeHint(self) -> QSize:
        inner = self.widget().minimumSizeHint().width() if self.widget() else 0
        return QSize(inner + self.verticalScrollBar().sizeHint().width(), 80)


def scrolling_body(view: QWidget) -> QVBoxLayout:
    """Puts a vertical scroll area in `view` and returns the layout to fill: its plots keep their minimum heights."""
    outer = QVBoxLayout(view)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = _VerticalScroll()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    body = QWidget()
    scroll.setWidget(body)
    outer.addWidget(scroll)
    return QVBoxLayout(body)
