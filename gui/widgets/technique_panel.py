"""Sliders, combos and checkboxes built from the techniques' field metadata: no per-technique
code here. One group per technique (its checkbox includes it in the recipe); the ticked techniques run in
core.recipe's working order, which the panel follows except for early_exit (an architecture change that is fitted
last, to the weights as they end up)."""
from __future__ import annotations

from PySide6.QtCore import QEvent, Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                               QLineEdit, QSlider, QSpinBox, QToolButton, QVBoxLayout, QWidget)

from core.recipe import in_working_order, working_rank
from core.techniques import all_techniques
from core.techniques.base import FAMILY_HELP

# Families in the order they run (shape changes and pruning need float weights, distill heals them, quantization
# packs them), each family's techniques by their place in the working order.
FAMILY_ORDER = ("architecture", "pruning", "distillation", "quantization", "kv_cache")


def _decimals(step: float) -> int:
    text = f"{step:.10f}".rstrip("0")
    return len(text.split(".")[1]) if "." in text else 0


def format_value(value, field: dict) -> str:
    unit = field.get("unit") or ""
    labels = field.get("labels") or {}
    if str(value) in labels:
        return labels[str(value)]
    if unit == "fraction" and isinstance(value, float):
        return f"{value * 100:.0f} %"
    if isinstance(value, float) and 0 < abs(value) < 1e-3:  # a learning rate reads 2.0e-4, not 0.00020
        value = f"{value:.1e}".replace("e-0", "e-")
    elif isinstance(value, float):
        value = f"{value:.{_decimals(field.get('step') or 0.01)}f}"
    return f"{value} {unit}".strip()


class FieldEditor(QWidget):
    """One field: a slider + value label, a combo, a checkbox or a text box, by its metadata."""
    changed = Signal()

    def __init__(self, field: dict, parent=None):
        super().__init__(parent)
        self.field = field
        t, lo, hi = field["type"], field.get("min"), field.get("max")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.slider = self.combo = self.check = self.spin = self.line = None
        if field.get("choices") is not None:
            self.combo = QComboBox()
            for c in field["choices"]:
                self.combo.addItem(format_value(c, field) if t != "str" else str(c), c)
            self.combo.currentIndexChanged.connect(self.changed)
            lay.addWidget(self.combo, 1)
        elif t == "bool":
            self.check = QCheckBox()
            self.check.toggled.connect(self.changed)
            lay.addWidget(self.check, 1)
        elif t in ("int", "float") and lo is not None and hi is not None:
            # a float slider runs over step indices: value = min + i * step
            self.step = field.get("step") or (1 if t == "int" else (hi - lo) / 100)
            self.slider = QSlider(Qt.Horizontal)
            self.slider.setRange(0, round((hi - lo) / self.step))
            self.slider.setPageStep(1)
            self.slider.valueChanged.connect(self._slid)
            self.value_label = QLabel()
            self.value_label.setMinimumWidth(64)
            self.value_label.setAlignment(Qt.AlignRight | Qt.AlignVCenter)
            lay.addWidget(self.slider, 1)
            lay.addWidget(self.value_label)
        elif t == "int":
            self.spin = QSpinBox()
            self.spin.setRange(int(lo if lo is not None else -2**31), int(hi if hi is not None else 2**31 - 1))
            self.spin.valueChanged.connect(self.changed)
            lay.addWidget(self.spin, 1)
        else:
            self.line = QLineEdit()
            self.line.textChanged.connect(self.changed)
            lay.addWidget(self.line, 1)
            if field.get("unit") == "file":  # a path: typed, pasted or picked
                self.line.setPlaceholderText("the shipped text")
                browse = QToolButton()
                browse.setText("…")
                browse.setToolTip("Pick a text file")
                browse.clicked.connect(self._pick)
                lay.addWidget(browse)
        for w in (self, self.slider, self.combo, self.check, self.spin, self.line):
            if w is not None:
                w.setToolTip(field.get("help") or "")
        self.set_value(field["default"])

    def _pick(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Calibration text", self.line.text(),
                                           "Text (*.txt *.raw *.tokens);;All files (*)")
        if f:
            self.line.setText(f)

    def _slid(self) -> None:
        self.value_label.setText(format_value(self.value(), self.field))
        self.changed.emit()

    def value(self):
        t = self.field["type"]
        if self.combo is not None:
            return self.combo.currentData()
        if self.check is not None:
            return self.check.isChecked()
        if self.slider is not None:
            v = self.field["min"] + self.slider.value() * self.step
            return int(round(v)) if t == "int" else round(v, _decimals(self.step) + 2)
        if self.spin is not None:
            return self.spin.value()
        return self.line.text()

    def set_value(self, v) -> None:
        if self.combo is not None:
            i = self.combo.findData(v)
            if i < 0:  # a choice given by its label
                i = self.combo.findText(str(v))
            if i >= 0:
                self.combo.setCurrentIndex(i)
        elif self.check is not None:
            self.check.setChecked(bool(v))
        elif self.slider is not None:
            self.slider.setValue(round((float(v) - self.field["min"]) / self.step))
            self._slid()
        elif self.spin is not None:
            self.spin.setValue(int(v))
        else:
            self.line.setText(str(v))


class ReadableLabel(QLabel):
    """A label that stays enabled inside an unticked checkable group box (which disables its children
    whenever it is unticked or gains one): disabled text is too faint to read (~1.7:1), and a
    technique's summary is what a learner reads before ticking it."""

    def changeEvent(self, ev) -> None:
        super().changeEvent(ev)
        if ev.type() == QEvent.EnabledChange and not self.isEnabled():
            self.setEnabled(True)


class TechniqueGroup(QGroupBox):
    """A technique: checkable title (include it), its summary, one editor per field; `changed` when an
    editor's value changes."""
    changed = Signal()

    def __init__(self, technique, parent=None):
        super().__init__(technique.name, parent)
        self.technique = technique
        self.setCheckable(True)
        self.setChecked(False)
        self.setToolTip(technique.summary)
        lay = QVBoxLayout(self)
        summary = self.summary = ReadableLabel(technique.summary)
        summary.setWordWrap(True)
        lay.addWidget(summary)
        self.body = QWidget()  # the sliders: shown while the technique is ticked
        form = QFormLayout(self.body)
        form.setContentsMargins(0, 0, 0, 0)
        form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
        lay.addWidget(self.body)
        self.body.setVisible(False)
        self.toggled.connect(self._ticked)
        self._editors: dict[str, FieldEditor] | None = None

    @property
    def editors(self) -> dict[str, FieldEditor]:
        """One editor per field, built when first needed (~120 sliders built at start held the window's
        opening ~60 ms; most techniques are never ticked)."""
        if self._editors is None:
            self._editors = {}
            form = self.body.layout()
            for f in self.technique.fields():
                ed = FieldEditor(f)
                label = QLabel(f["name"].replace("_", " "))
                label.setToolTip(f.get("help") or "")
                form.addRow(label, ed)
                ed.changed.connect(self.changed)
                self._editors[f["name"]] = ed
        return self._editors

    def _ticked(self, on: bool) -> None:
        if on:
            self.editors  # noqa: B018 (built on first tick)
        self.body.setVisible(on)

    def values(self) -> dict:
        return {name: ed.value() for name, ed in self.editors.items()}


class TechniquePanel(QWidget):
    changed = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        techs = sorted(all_techniques(), key=lambda t: (
            FAMILY_ORDER.index(t.family) if t.family in FAMILY_ORDER else len(FAMILY_ORDER), working_rank(t.name),
            t.name))
        self.groups: dict[str, TechniqueGroup] = {}
        family = None
        for t in techs:
            if t.family != family:  # a header with the family's one-line explainer
                family = t.family
                head = QLabel(f"<b>{family.replace('_', ' ').upper()}</b> — {FAMILY_HELP.get(family, '')}")
                head.setWordWrap(True)
                head.setContentsMargins(0, 8, 0, 0)
                lay.addWidget(head)
            g = TechniqueGroup(t)
            g.toggled.connect(self.changed)
            g.changed.connect(self.changed)
            lay.addWidget(g)
            self.groups[t.name] = g

    def recipe_data(self) -> dict:
        """{"steps": [...]} of the ticked techniques, in the working order (for core.recipe.from_data)."""
        return {"steps": in_working_order([{"technique": name, **g.values()}
                                           for name, g in self.groups.items() if g.isChecked()])}

    def set_recipe(self, recipe) -> list[str]:
        """Shows a core.recipe.Recipe; returns notes on what the panel cannot show as given."""
        notes, seen = [], []
        for g in self.groups.values():
            g.blockSignals(True)
            g.setChecked(False)
        for step in recipe.steps:
            g = self.groups.get(step.name)
            if g is None:
                notes.append(f"{step.name} has no panel")
                continue
            if step.name in seen:
                notes.append(f"{step.name} appears twice; the panel keeps the last")
            seen.append(step.name)
            g.setChecked(True)
            for name, ed in g.editors.items():
                ed.blockSignals(True)
                ed.set_value(getattr(step.config, name))
                ed.blockSignals(False)
        given, order = list(dict.fromkeys(seen)), [s["technique"] for s in self.recipe_data()["steps"]]
        if given != order:
            notes.append("the panel runs them as " + " → ".join(order))
        for g in self.groups.values():
            g.body.setVisible(g.isChecked())  # its toggled signal was blocked: show the sliders of what is ticked
            g.blockSignals(False)
        self.changed.emit()
        return notes
