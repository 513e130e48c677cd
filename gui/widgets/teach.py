"""Teaching mode: the explainer of the technique in hand (Markdown shipped in
resources/explainers, rendered offline), the guided lab's checklist that ticks itself from the
ledger, and a larger-fonts switch for the projector."""
from __future__ import annotations

import re

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QTextBrowser,
                               QVBoxLayout, QWidget)

from core import paths
from core.lab import LAB, progress


def explainer(name: str) -> str:
    f = paths.resources_dir() / "explainers" / f"{name}.md"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    return f"# {name}\n\nNo explainer is shipped for this technique yet."


def for_dock(md: str) -> str:
    """An explainer fitted to a narrow dock: headings two levels down (a title in h1 filled it: five lines
    with larger fonts), and code blocks (the one formula) as inline code lines, which wrap; a code block
    ran off the side behind a horizontal scroll bar."""
    md = re.sub(r"(?m)^(#{1,4}) ", r"\1## ", md)
    return re.sub(r"(?ms)^```[^\n]*\n(.*?)\n```$",
                  lambda m: "  \n".join(f"`{line}`" for line in m.group(1).splitlines()), md)


class TeachPanel(QWidget):
    larger_fonts = Signal(bool)

    def __init__(self, technique_names: list[str], parent=None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        top = QHBoxLayout()
        top.addWidget(QLabel("<b>Explainer</b>"))
        self.technique = QComboBox()
        for n in technique_names:
            self.technique.addItem(n, n)
        self.technique.currentIndexChanged.connect(lambda _: self.show_technique(self.technique.currentData()))
        top.addWidget(self.technique, 1)
        lay.addLayout(top)
        self.fonts = QCheckBox("Larger fonts (projector)")
        self.fonts.toggled.connect(self.larger_fonts)
        lay.addWidget(self.fonts)  # its own row: beside the combo it widened the dock past a laptop screen
        self.text = QTextBrowser()
        self.text.setOpenExternalLinks(False)
        lay.addWidget(self.text, 3)
        lab = QLabel("<b>Lab</b> — each step ticks itself when you have done it")
        lab.setWordWrap(True)
        lay.addWidget(lab)
        self.checklist = QListWidget()
        for s in LAB:
            item = QListWidgetItem(f"{s.title}")
            item.setData(Qt.UserRole, s.key)
            item.setToolTip(s.how)
            item.setFlags(Qt.ItemIsEnabled)  # ticked by the app, not by hand
            item.setCheckState(Qt.Unchecked)
            self.checklist.addItem(item)
        self.checklist.currentRowChanged.connect(self._step_hint)
        lay.addWidget(self.checklist, 2)
        self.hint = QLabel()
        self.hint.setWordWrap(True)
        lay.addWidget(self.hint)
        if technique_names:
            self.show_technique(technique_names[0])

    def show_technique(self, name: str) -> None:
        i = self.technique.findData(name)
        if i >= 0 and i != self.technique.currentIndex():
            self.technique.setCurrentIndex(i)  # re-enters here through the signal
            return
        self.text.setMarkdown(for_dock(explainer(name)))

    def update_progress(self, runs: list[dict]) -> dict:
        done = progress(runs)
        nxt = None
        for k in range(self.checklist.count()):
            item = self.checklist.item(k)
            ok = done[item.data(Qt.UserRole)]
            item.setCheckState(Qt.Checked if ok else Qt.Unchecked)
            if not ok and nxt is None:
                nxt = k
        if nxt != getattr(self, "_next", -1):  # a new next step: open its technique's explainer (once)
            self._next = nxt
            if nxt is not None and LAB[nxt].technique:
                self.show_technique(LAB[nxt].technique)
        n = sum(done.values())
        self.hint.setText(f"{n} of {len(LAB)} done. " + (f"Next: <b>{LAB[nxt].title}</b> — {LAB[nxt].how}"
                                                         if nxt is not None else "The lab is complete."))
        return done

    def _step_hint(self, row: int) -> None:
        if row >= 0:
            self.hint.setText(f"<b>{LAB[row].title}</b> — {LAB[row].how}")
