"""Sliders, combos and checkboxes built from the techniques' field metadata: no per-technique
code here. One group per technique (its checkbox includes it in the recipe); the ticked techniques run in
core.recipe's working order, which the panel follows except for early_exit (an architecture change that is fitted
last, to the weights as they end up)."""
from __future__ import annotations

import math

from PySide6.QtCore import QEvent, Qt, Signal
from PySide6.QtGui import QValidator
from PySide6.QtWidgets import (QAbstractSpinBox, QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout,
                               QGroupBox, QHBoxLayout, QLabel, QLineEdit, QSlider, QToolButton, QVBoxLayout, QWidget)

from core.recipe import in_working_order, working_rank
from core.techniques import all_techniques
from core.techniques.base import FAMILY_HELP

# Families in the order they run (shape changes and pruning need float weights, distill heals them, quantization
# packs them), each family's techniques by their place in the working order.
FAMILY_ORDER = ("architecture", "pruning", "distillation", "quantization", "kv_cache")


def _decimals(step: float) -> int:
    text = f"{step:.10f}".rstrip("0")
    return len(text.split(".")[1]) if "." in text else 0


def _clean(v: float) -> float:
    return float(f"{v:.10g}")  # 0.15, not 0.15000000000000002 (a step's multiple in binary)


def format_value(value, field: dict) -> str:
    unit = field.get("unit") or ""
    labels = field.get("labels") or {}
    if str(value) in labels:
        return labels[str(value)]
    # the step's decimals, more for a value between steps (typed, or from a recipe file): 0.0011, not 0.001
    decimals = max(_decimals(field.get("step") or 0.01), min(6, _decimals(_clean(value)))) \
        if isinstance(value, float) else 0
    if unit == "fraction" and isinstance(value, float):
        return f"{value * 100:.{max(0, decimals - 2)}f} %"
    if isinstance(value, float) and 0 < abs(value) < 1e-3:  # a learning rate reads 2.0e-4, not 0.00020
        value = f"{value:.1e}".replace("e-0", "e-")
    elif isinstance(value, float):
        value = f"{value:.{decimals}f}"
    return f"{value} {unit}".strip()


def parse_value(text: str, field: dict) -> float | None:
    """The number a user typed into a value box: "65 %", "0.65", "2e-4", "8 bits" or a label ("per-channel")."""
    text = text.strip()
    for value, label in (field.get("labels") or {}).items():
        if text == label:
            return float(value)
    unit = field.get("unit") or ""
    percent = text.endswith("%")
    number = text.rstrip("%").strip()
    if unit and number.endswith(unit):
        number = number[:-len(unit)].strip()
    try:
        v = float(number.split()[0]) if number else None
    except ValueError:
        return None
    if v is not None and unit == "fraction" and (percent or v > 1):
        v /= 100  # a fraction is shown and typed as a percentage
    return v


LONG_UNIT = 9  # characters: a longer unit ("× mean diag") goes in the row's label, not in the value box


def row_label(field: dict) -> str:
    unit = field.get("unit") or ""
    name = field["name"].replace("_", " ")
    return f"{name} ({unit})" if len(unit) > LONG_UNIT and unit != "file" else name


class ValueBox(QDoubleSpinBox):
    """The value beside a slider, as the panel shows it ("65 %", "2.0e-4"), editable: a value typed (or read
    from a recipe) between the slider's steps is kept as it is, not rounded to a step."""

    def __init__(self, field: dict, parent=None):
        super().__init__(parent)
        self.field = field if len(field.get("unit") or "") <= LONG_UNIT else {**field, "unit": ""}
        self.setDecimals(12)  # the stored value; what is shown is format_value's
        lo, hi = field.get("min"), field.get("max")
        self.setRange(-1e15 if lo is None else float(lo), 1e15 if hi is None else float(hi))
        self.setButtonSymbols(QAbstractSpinBox.NoButtons)
        self.setKeyboardTracking(False)  # one change when Enter is pressed or focus leaves, not per key
        self.setAlignment(Qt.AlignRight | Qt.AlignVCenter)

    def typed(self, v: float):
        return int(round(v)) if self.field["type"] == "int" else v

    def textFromValue(self, v: float) -> str:
        return format_value(self.typed(v), self.field)

    def valueFromText(self, text: str) -> float:
        v = parse_value(text, self.field)
        return self.value() if v is None else v

    def validate(self, text: str, pos: int):
        v = parse_value(text, self.field)
        if v is None or not self.minimum() <= v <= self.maximum():
            return QValidator.Intermediate, text, pos
        return QValidator.Acceptable, text, pos

    def fixup(self, text: str) -> str:
        return self.textFromValue(self.value())  # an unreadable or out-of-range entry goes back to the value


class FieldEditor(QWidget):
    """One field: a slider + editable value box, a combo, a checkbox or a text box, by its metadata."""
    changed = Signal()
    MAX_STOPS = 5000  # a wider range (a seed) gets the box alone: a slider stop per pixel cannot be aimed

    def __init__(self, field: dict, parent=None):
        super().__init__(parent)
        self.field = field
        t, lo, hi = field["type"], field.get("min"), field.get("max")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.slider = self.combo = self.check = self.box = self.line = None
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
        elif t in ("int", "float"):
            bounded = lo is not None and hi is not None
            self.step = field.get("step") or (1 if t == "int" or not bounded else (hi - lo) / 100)
            self.box = ValueBox(field)
            self.box.valueChanged.connect(self._typed)
            self.stops = self._stops(lo, hi) if bounded else []
            if self.stops:
                self.slider = QSlider(Qt.Horizontal)
                self.slider.setRange(0, len(self.stops) - 1)
                self.slider.setPageStep(1)
                self.slider.valueChanged.connect(self._slid)
                # one width for every box, so the sliders line up (a longer unit is in the row's label)
                self.box.setFixedWidth(self.box.fontMetrics().horizontalAdvance("5000 sequences") + 12)
                lay.addWidget(self.slider, 1)
                lay.addWidget(self.box)
            else:
                lay.addWidget(self.box, 1)
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
        for w in (self, self.slider, self.combo, self.check, self.box, self.line):
            if w is not None:
                w.setToolTip(field.get("help") or "")
        self.set_value(field["default"])

    def _stops(self, lo: float, hi: float) -> list[float]:
        """The values the slider's positions stand for: min + i * step, or on a log scale ~24 per decade of two
        significant digits (2e-4, 2.2e-4, 2.4e-4 … for a learning rate), a whole number of steps for an int."""
        if self.field.get("scale") != "log":
            n = round((hi - lo) / self.step)
            return [] if n > self.MAX_STOPS else [_clean(lo + i * self.step) for i in range(n + 1)]
        n = max(1, round(24 * math.log10(hi / lo)))
        stops = []
        for i in range(n + 1):
            v = lo * (hi / lo) ** (i / n)
            v = float(f"{v:.2g}")  # two significant digits: stops read as round numbers
            if self.field["type"] == "int":  # whole steps (a window of 16-token blocks); a float keeps its digits
                v = _clean(min(hi, max(lo, lo + round((v - lo) / self.step) * self.step)))
            if not stops or v > stops[-1]:
                stops.append(v)
        return stops

    def _nearest_stop(self, v: float) -> int:
        return min(range(len(self.stops)), key=lambda i: abs(self.stops[i] - v))

    def _pick(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Calibration text", self.line.text(),
                                           "Text (*.txt *.raw *.tokens);;All files (*)")
        if f:
            self.line.setText(f)

    def _slid(self, i: int) -> None:
        self.box.blockSignals(True)
        self.box.setValue(self.stops[i])
        self.box.blockSignals(False)
        self.changed.emit()

    def _typed(self, v: float) -> None:
        if self.slider is not None:  # the slider goes to the nearest stop; the box keeps what was typed
            self.slider.blockSignals(True)
            self.slider.setValue(self._nearest_stop(v))
            self.slider.blockSignals(False)
        self.changed.emit()

    def value(self):
        t = self.field["type"]
        if self.combo is not None:
            return self.combo.currentData()
        if self.check is not None:
            return self.check.isChecked()
        if self.box is not None:
            v = self.box.value()
            return int(round(v)) if t == "int" else round(v, _decimals(self.step) + 6)
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
        elif self.box is not None:
            self.box.blockSignals(True)
            self.box.setValue(float(v))  # as given: a recipe's 0.33 stays 0.33 between the 5 % stops
            self.box.blockSignals(False)
            self._typed(self.box.value())
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
                label = QLabel(row_label(f))
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
