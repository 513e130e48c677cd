"""Light / dark: follow the system's colour scheme (Qt's style hints), or a manual override kept
in the settings. The palette is set explicitly (Fusion), so the override works on every platform."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication, QStyleFactory

MODES = ("system", "light", "dark")


def dark_palette() -> QPalette:
    p = QPalette()
    base, window, text = QColor("#1e1f22"), QColor("#2b2d30"), QColor("#dfe1e5")
    for role, c in ((QPalette.Window, window), (QPalette.WindowText, text), (QPalette.Base, base),
                    (QPalette.AlternateBase, QColor("#26282b")), (QPalette.ToolTipBase, window),
                    (QPalette.ToolTipText, text), (QPalette.Text, text), (QPalette.Button, window),
                    (QPalette.ButtonText, text), (QPalette.BrightText, QColor("#ff6b6b")),
                    (QPalette.Link, QColor("#6ea8fe")), (QPalette.Highlight, QColor("#2f65ca")),
                    (QPalette.HighlightedText, QColor("#ffffff")), (QPalette.PlaceholderText, QColor("#8c8f94"))):
        p.setColor(role, c)
    for role in (QPalette.Text, QPalette.ButtonText, QPalette.WindowText):
        p.setColor(QPalette.Disabled, role, QColor("#6f737a"))
    return p


def system_is_dark(app: QApplication) -> bool:
    return app.styleHints().colorScheme() == Qt.ColorScheme.Dark


def apply(app: QApplication, mode: str) -> bool:
    """Sets the palette for `mode`; -> True when the result is dark."""
    if app.style().name().lower() != "fusion":
        app.setStyle(QStyleFactory.create("Fusion"))
    dark = mode == "dark" or (mode == "system" and system_is_dark(app))
    app.setPalette(dark_palette() if dark else app.style().standardPalette())
    return dark
