"""Help → About: the app's version, the versions it runs on, its folders, and the licenses of
what it ships (the bundled model's and the text slices' included)."""
from __future__ import annotations

import html

from PySide6.QtWidgets import QDialog, QDialogButtonBox, QTextBrowser, QVBoxLayout

from core import about


def about_html() -> str:
    v = about.versions()
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(x))}</td></tr>" for k, x in v.items())
    dirs = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(x)}</td></tr>" for k, x in about.folders().items())
    return (f"<h2>Squeeze Studio {html.escape(v.get('squeeze-studio', ''))}</h2>"
            "<p>Compress language models with sliders, measure the trade-offs, export to ONNX — offline.</p>"
            f"<h3>Versions</h3><table cellspacing=4>{rows}</table>"
            f"<h3>Folders</h3><table cellspacing=4>{dirs}</table>")


class AboutDialog(QDialog):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWindowTitle("About Squeeze Studio")
        self.resize(640, 600)
        lay = QVBoxLayout(self)
        self.text = QTextBrowser()
        self.text.setOpenExternalLinks(False)
        self.text.setHtml(about_html())
        cursor = self.text.textCursor()
        cursor.movePosition(cursor.MoveOperation.End)
        import re
        md = re.sub(r"(?m)^# ", "#### ", about.licenses())  # the shipped note's title under ours
        cursor.insertBlock()
        cursor.insertMarkdown("### Licenses\n\n" + md)
        self.text.moveCursor(cursor.MoveOperation.Start)
        lay.addWidget(self.text)
        buttons = QDialogButtonBox(QDialogButtonBox.Close)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)
