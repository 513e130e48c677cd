"""Side-by-side generation: pick a reference and a variant run, type a prompt; both continue it
greedily in the worker. The variant's tokens are coloured by KL(reference || variant) of their
next-token distributions, the first token where the outputs differ is marked, and clicking a
token shows both models' top-5 next tokens at that position."""
from __future__ import annotations

import html

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (QApplication, QComboBox, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSpinBox,
                               QTextBrowser, QVBoxLayout, QWidget)

from gui.widgets.layout import narrow

# KL (nats) -> background: agreement is white, a different distribution deep red
KL_STEPS = ((0.01, "#ffffff"), (0.05, "#fff3e0"), (0.2, "#ffcc80"), (0.5, "#ff8a65"), (1.0, "#e57373"),
            (float("inf"), "#c62828"))


def kl_colour(kl: float) -> str:
    return next(c for limit, c in KL_STEPS if kl < limit)


def _piece(text: str) -> str:
    return html.escape(text).replace("\n", "⏎<br>") or "∅"


class CompareView(QWidget):
    """Emits `compare(reference_id, variant_id, prompt, new_tokens)`; the window runs the job."""
    compare = Signal(str, str, str, int)

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        # three short lines of controls, so the two outputs keep their height on a short (projector) screen
        self.reference = QComboBox()
        self.variant = QComboBox()
        self.reference.setToolTip("The model the variant is compared with (usually the baseline)")
        self.variant.setToolTip("The compressed model whose tokens are coloured")
        narrow(self.reference, self.variant, chars=6)  # a long recipe label must not set the view's width
        pick = QHBoxLayout()
        pick.addWidget(QLabel("reference"))
        pick.addWidget(self.reference, 1)
        pick.addWidget(QLabel("vs variant"))
        pick.addWidget(self.variant, 1)
        lay.addLayout(pick)
        row = QHBoxLayout()
        self.prompt = QLineEdit("The capital of France is")
        self.prompt.setPlaceholderText("a prompt both models continue")
        self.new_tokens = QSpinBox()
        self.new_tokens.setRange(1, 256)
        self.new_tokens.setValue(32)
        self.new_tokens.setSuffix(" tokens")
        self.button = QPushButton("Generate both")
        self.button.clicked.connect(self._clicked)
        self.prompt.returnPressed.connect(self._clicked)
        row.addWidget(QLabel("prompt"))
        row.addWidget(self.prompt, 1)
        lay.addLayout(row)
        go = QHBoxLayout()
        go.addWidget(self.new_tokens)
        go.addWidget(self.button)
        go.addStretch(1)
        lay.addLayout(go)
        outs = QHBoxLayout()
        self.ref_out = QTextBrowser()
        self.var_out = QTextBrowser()
        self.var_out.setOpenLinks(False)
        self.var_out.anchorClicked.connect(lambda url: self.show_top(int(url.toString().split(":")[1])))
        self.ref_out.setOpenLinks(False)
        self.ref_out.anchorClicked.connect(lambda url: self.show_top(int(url.toString().split(":")[1])))
        outs.addWidget(self.ref_out)
        outs.addWidget(self.var_out)
        lay.addLayout(outs, 1)
        self.top = QLabel("Click a token to see both models' top-5 next tokens there.")
        self.top.setWordWrap(True)
        self.top.setTextFormat(Qt.RichText)
        lay.addWidget(self.top)
        # the swatches carry their own text colour: the palette's (light in the dark theme) is unreadable on them
        legend = " ".join(f"<span style='background:{c};color:black'>&nbsp;&lt;{lim:g}&nbsp;</span>"
                          if lim != float("inf") else f"<span style='background:{c};color:white'>&nbsp;more&nbsp;</span>"
                          for lim, c in KL_STEPS)
        self.legend = QLabel(f"KL per token (nats): {legend} · ▸ first difference")
        self.legend.setWordWrap(True)
        lay.addWidget(self.legend)
        self.result: dict | None = None
        self.rows: list[dict] = []

    def set_dark(self, dark: bool) -> None:
        """Re-renders the tokens in the new palette's text colour."""
        if self.result:
            self.show_result(self.result)

    def set_rows(self, rows: list[dict]) -> None:
        """Finished runs that have a model to load: the baseline and saved variants."""
        keep = [r for r in rows if r["status"] == "done" and not r.get("export") and (r["baseline"] or r["variant_dir"])]
        # a baseline measured under other eval settings is the same model: listed once (the newest)
        newest = {r["model"]: r["id"] for r in keep if r["baseline"]}
        keep = [r for r in keep if not r["baseline"] or newest[r["model"]] == r["id"]]
        base = {r["id"] for r in keep if r["baseline"]}
        seen: dict[str, int] = {}
        for r in keep:
            seen[r["label"]] = seen.get(r["label"], 0) + 1
        # the same recipe run twice: each entry says which run it is
        names = {r["id"]: r["label"] if seen[r["label"]] == 1 else f"{r['label']} · run {r['id'][:6]}" for r in keep}
        listed = [(r["id"], names[r["id"]]) for r in keep]
        if listed == getattr(self, "_listed", None):  # e.g. a job started: the boxes stay as they are
            return
        self._listed = listed
        for box, want_base in ((self.reference, True), (self.variant, False)):
            current = box.currentData()
            box.blockSignals(True)
            box.clear()
            for r in keep:
                box.addItem(names[r["id"]], r["id"])
            i = box.findData(current)
            if i < 0 or (not want_base and current in base):  # the variant: the newest variant by default
                order = range(len(keep)) if want_base else reversed(range(len(keep)))
                i = next((k for k in order if (keep[k]["id"] in base) == want_base), max(i, 0))
            box.setCurrentIndex(i)
            box.blockSignals(False)
        self.rows = keep
        self.button.setEnabled(bool(keep))

    def _clicked(self) -> None:
        if self.reference.currentData() and self.variant.currentData():
            self.compare.emit(self.reference.currentData(), self.variant.currentData(), self.prompt.text(),
                              self.new_tokens.value())

    def show_result(self, r: dict) -> None:
        self.result = r
        labels = r.get("labels") or {}
        prompt = f"<span style='color:gray'>{_piece(r['prompt'])}</span>"
        diff = r.get("first_diff")

        plain = QApplication.palette().color(QPalette.Text).name()  # tokens without a KL background

        def tokens(side: str, colour: bool) -> str:
            out = []
            for i, t in enumerate(r[side]["tokens"]):
                style = f"background:{kl_colour(r['variant']['kl'][i])};" if colour else ""
                if i == diff:  # Qt's rich text has no borders on spans: underline it, bold, in blue
                    style += "text-decoration:underline;font-weight:bold;color:#1565c0;"
                tip = f"KL {r['variant']['kl'][i]:.3f}" if colour else ""
                mark = "<span style='color:#1565c0'>▸</span>" if i == diff else ""
                ink = "black" if colour else plain  # the KL backgrounds are all light
                out.append(f"{mark}<a href='tok:{i}' style='color:{ink};text-decoration:none' title='{tip}'>"
                           f"<span style='{style}'>{_piece(t)}</span></a>")
            return "".join(out)

        self.ref_out.setHtml(f"<b>{html.escape(labels.get('reference') or 'reference')}</b><br>{prompt}"
                             f"{tokens('reference', False)}")
        where = "identical" if diff is None else f"first difference at token {diff + 1}"
        self.var_out.setHtml(f"<b>{html.escape(labels.get('variant') or 'variant')}</b> — mean KL "
                             f"{r['mean_kl']:.3f}, {where}<br>{prompt}{tokens('variant', True)}")
        if diff is not None and diff < len(r["top"]):
            self.show_top(diff)

    def show_top(self, i: int) -> None:
        r = self.result
        if not r or i >= len(r["top"]):
            return
        t = r["top"][i]

        def col(rows):
            return "".join(f"<tr><td>{_piece(x['token'])}</td><td align=right>{x['p'] * 100:.1f} %</td></tr>" for x in rows)
        self.top.setText(
            f"Next token after the variant's first {i} generated tokens (its token here: "
            f"<b>{_piece(r['variant']['tokens'][i])}</b>, KL {r['variant']['kl'][i]:.3f}):"
            f"<table cellspacing=6><tr><td valign=top><b>reference</b><table>{col(t['reference'])}</table></td>"
            f"<td valign=top><b>variant</b><table>{col(t['variant'])}</table></td></tr></table>")
