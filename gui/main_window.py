"""The main window: model, techniques, eval settings and the run bar on the left; results
table, trade-off plot and ONNX export on the right; the worker's log in a dock.

Thin by design: it builds JobSpecs from the widgets, hands them to the worker process and
listens. Nothing here imports torch; every number comes from the ledger."""
from __future__ import annotations

import gc
import html
import json
import re
import threading
from pathlib import Path

from PySide6.QtCore import QPoint, QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import (QApplication, QComboBox, QDockWidget, QDoubleSpinBox, QFileDialog, QHBoxLayout, QLabel,
                               QMainWindow, QMenu, QMessageBox, QPlainTextEdit, QProgressBar, QPushButton, QScrollArea,
                               QSizePolicy, QSplitter, QTabWidget, QToolButton, QVBoxLayout, QWidget)

from core import models, paths, preflight, reuse
from core import recipe as recipes
from core.errors import PreflightError, SqueezeError
from core.export.folder import check_export_folder
from core.jobs.events import shown_eta
from core.jobs.spec import JobSpec
from core.lab import KINDS as LAB_KINDS
from core.ledger import Ledger
from core.results import TARGETS, fmt_duration, fmt_ppl, recommend, table_rows

from .widgets.eval_panel import EvalPanel
from . import theme
from .crash import log as crash_log
from .widgets.compare_view import CompareView
from .widgets.export_panel import ExportPanel
from .widgets.sensitivity_view import SensitivityView
from .widgets.teach import TeachPanel
from .widgets.weight_view import WeightView
from .widgets.loss_curve import LossCurve
from .widgets.model_panel import ModelPanel
from .widgets.results_table import ResultsTable
from .widgets.technique_panel import TechniquePanel
from .widgets.layout import narrow
from .widgets.plotting import font_plot
from .widgets.tradeoff_plot import TradeoffPlot
from .worker_client import WorkerClient

ERROR_STYLE, INFO_STYLE = "color: #c62828;", ""  # info: no style of its own, so it follows the theme


class Store:
    """Window settings as JSON values in an INI file beside the ledger (so SQUEEZE_HOME, which
    tests use, isolates it too); JSON because INI loses types (a one-item list comes back a str)."""

    def __init__(self):
        self.q = QSettings(str(paths.data_dir() / "studio.ini"), QSettings.IniFormat)

    def get(self, key: str, default=None):
        try:
            return json.loads(self.q.value(key, ""))
        except (TypeError, ValueError):
            return default

    def set(self, key: str, value) -> None:
        self.q.setValue(key, json.dumps(value))


def fmt_eta(eta, what: str = "") -> str:
    if eta is None:
        return ""
    return f" — {what}ETA {fmt_duration(eta)}"


def _steps_saved(k: int) -> str:
    return "step 1" if k == 1 else f"steps 1–{k}"


class MainWindow(QMainWindow):
    def __init__(self, model: str | None = None, eval_settings: dict | None = None,
                 auto_baseline: bool = True, ledger: Ledger | None = None, teach: bool | None = None):
        super().__init__()
        self.setWindowTitle("Squeeze Studio")
        self.setAcceptDrops(True)  # a model folder or .gguf dropped on the window opens it
        # the engine's source fingerprint (which saved variants a recipe may start from, for the estimate):
        # ~0.1 s of package metadata and hashing, off the GUI thread
        threading.Thread(target=reuse.code_stamp, daemon=True, name="code-stamp").start()
        self.ledger = ledger or Ledger()
        self.ledger.mark_interrupted()  # runs left 'running' by an app that is gone
        self.store = Store()
        self.auto_baseline = auto_baseline
        self.model = ""
        self.model_ok = False
        self.eval_key: str | None = None
        self._shown: tuple | None = None  # (model, eval key, table rows) last drawn by refresh()
        self.runs: list[dict] = []
        self.queue: list[JobSpec] = []
        self.current: JobSpec | None = None
        self._failed_baselines: set[tuple[str, str]] = set()  # (model, eval key): not queued again by itself

        self.client = WorkerClient(self)
        self._later = 0  # deferred GUI work pending (see later())
        self.client.progress.connect(self._on_progress)
        self.client.log.connect(self._on_log)
        self.client.metric.connect(self._on_metric)
        self.client.result.connect(self._on_result)
        self.client.error.connect(self._on_error)
        self.client.cancelled.connect(lambda e: self.say("Cancelled."))
        self.client.finished.connect(self._on_finished)

        # eval edits settle for a moment before a new baseline may start
        self._eval_timer = QTimer(self, singleShot=True, interval=600)
        self._eval_timer.timeout.connect(self._eval_changed)
        self._build()

        self.eval_panel.set_settings(eval_settings or self.store.get("eval", {}))
        self.model_panel.add_models(list(models.BUNDLED) + self.store.get("recent", [])
                                    + sorted({r["model"] for r in self.ledger.rows(kinds=("eval",))
                                              if r["status"] == "done"}))  # not a typo's failed run
        self._update_eval_key()
        self.set_model(model or self.store.get("model") or models.DEFAULT_MODEL)
        self.set_teaching(self.store.get("teach", False) if teach is None else teach)
        self.resize(1440, 900)
        geo = self.store.q.value("geometry")
        if geo is not None:
            self.restoreGeometry(geo)
        # the startup objects (Qt wrappers, pyqtgraph, numpy: ~70,000) never become garbage; left in the
        # collector's generations, each full collection walks them all on the GUI thread (~50 ms on a slow
        # 2-core CPU, a visible stall while a job runs). Frozen, a collection walks only what came later.
        gc.freeze()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        self.model_panel = ModelPanel()
        self.model_panel.chosen.connect(self.set_model)
        self.model_panel.facts.connect(self._on_facts)
        self.techniques = TechniquePanel()
        self.techniques.changed.connect(self._recipe_changed)
        self.eval_panel = EvalPanel()
        self.eval_panel.changed.connect(self._eval_timer.start)

        recipe_box = QWidget()
        rl = QVBoxLayout(recipe_box)
        rl.setContentsMargins(0, 0, 0, 0)
        self.recipe_label = QLabel()
        self.recipe_label.setWordWrap(True)
        rl.addWidget(self.recipe_label)
        # the shipped recipes, each with what it measured on the bundled model (its tooltip); a menu, not a combo
        # box: a wheel turned over a combo in the scrolling settings would load a recipe over the user's
        bundled_error = "no bundled recipes in this install"
        try:
            self.bundled_recipes = recipes.bundled()
        except SqueezeError as e:  # the app still opens; the button says why it is off
            self.bundled_recipes, bundled_error = [], str(e)
        self.bundled_menu = QMenu("&Bundled recipes", self)
        self.bundled_menu.setToolTipsVisible(True)
        for b in self.bundled_recipes:
            a = self.bundled_menu.addAction(b.name)
            a.setData(b.id)
            a.setToolTip(f"<p>{html.escape(b.description)}</p>")
            a.triggered.connect(lambda _=False, i=b.id: self.open_recipe(i))
        self.bundled_button = QToolButton()
        self.bundled_button.setText("Start from a bundled recipe")
        self.bundled_button.setToolTip("Recipes shipped with the app, with what each measured on the bundled model")
        self.bundled_button.setMenu(self.bundled_menu)
        self.bundled_button.setPopupMode(QToolButton.InstantPopup)
        self.bundled_button.setEnabled(bool(self.bundled_recipes))
        if not self.bundled_recipes:
            self.bundled_button.setToolTip(bundled_error)
        rl.addWidget(self.bundled_button)
        rb = QHBoxLayout()
        self.open_recipe_button = QPushButton("Open recipe…")
        self.open_recipe_button.clicked.connect(self.open_recipe)
        self.save_recipe_button = QPushButton("Save recipe…")
        self.save_recipe_button.clicked.connect(self.save_recipe)
        rb.addWidget(self.open_recipe_button)
        rb.addWidget(self.save_recipe_button)
        rb.addStretch(1)
        rl.addLayout(rb)

        left_inner = QWidget()
        ll = QVBoxLayout(left_inner)
        ll.addWidget(self.model_panel)
        techniques_head = QLabel("<b>Techniques</b> — tick to include; they run in the order listed under Recipe")
        techniques_head.setWordWrap(True)
        ll.addWidget(techniques_head)
        ll.addWidget(self.techniques)
        ll.addWidget(recipe_box)
        ll.addWidget(self.eval_panel)
        ll.addStretch(1)
        scroll = self.left_scroll = QScrollArea()
        scroll.setWidget(left_inner)
        scroll.setWidgetResizable(True)
        scroll.setMinimumWidth(330)  # with the right side's minimum, the window fits a 1024-pixel screen

        # run bar: always visible under the scrolling settings
        self.run_button = QPushButton("Run")
        self.run_button.setDefault(True)
        self.run_button.setToolTip("Apply the ticked techniques, save the variant, measure it")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.rerun_button = QPushButton("Re-run")
        self.rerun_button.setToolTip("Run the selected interrupted, failed or cancelled run again (a distillation "
                                     "resumes from its last checkpoint)")
        self.rerun_button.setEnabled(False)
        self.rerun_button.clicked.connect(self.rerun_selected)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.stage_label = QLabel("idle")
        # progress text changes ~10 times a second: its width must not re-lay out the whole window
        self.stage_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextSelectableByMouse)
        run_bar = QWidget()
        rbl = QVBoxLayout(run_bar)
        rbl.setContentsMargins(8, 4, 8, 8)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.rerun_button)
        buttons.addWidget(self.progress, 1)
        rbl.addLayout(buttons)
        self.estimate_label = QLabel()
        self.estimate_label.setStyleSheet("color: gray")
        self.estimate_label.setWordWrap(True)  # a long estimate wraps instead of widening the left panel
        self.estimate_label.setToolTip("Preflight: peak RAM and time this recipe should take, corrected by what "
                                       "earlier runs of the same techniques really used on this machine")
        rbl.addWidget(self.estimate_label)
        rbl.addWidget(self.stage_label)
        self.loss_curve = LossCurve()  # live: distill's loss, shown while a job sends points
        rbl.addWidget(self.loss_curve)
        rbl.addWidget(self.message)

        left = QWidget()
        lv = QVBoxLayout(left)
        lv.setContentsMargins(0, 0, 0, 0)
        lv.addWidget(scroll, 1)
        lv.addWidget(run_bar)

        self.table = ResultsTable()
        self.table.selected.connect(self._row_selected)
        self.table.opened.connect(self.load_run_recipe)
        self.table.forget.connect(self.forget_run)
        self.plot = TradeoffPlot()
        self.plot.point_clicked.connect(self._point_clicked)
        self.export_panel = ExportPanel()
        self.export_panel.export.connect(self._export_clicked)
        self.compare_view = CompareView()
        self.compare_view.compare.connect(self.compare)
        self.views = QTabWidget()
        self.views.addTab(self.plot, "Trade-off")
        self.views.addTab(self.compare_view, "Side by side")
        self.weight_view = WeightView()
        self.weight_view.load.connect(self.view_weights)
        self.views.addTab(self.weight_view, "Weights")
        self.sensitivity_view = SensitivityView()
        self.sensitivity_view.scan.connect(self.scan_sensitivity)
        self.sensitivity_view.exclude.connect(self.exclude_module)
        self.sensitivity_view.mixed.connect(self.run_mixed_precision)
        self.views.addTab(self.sensitivity_view, "Sensitivity")
        bottom = QSplitter(Qt.Horizontal)
        bottom.addWidget(self.views)
        bottom.addWidget(self.export_panel)
        bottom.setStretchFactor(0, 1)
        bottom.setStretchFactor(1, 0)
        bottom.setSizes([680, 330])
        right = QSplitter(Qt.Vertical)
        table_box = QWidget()
        tl = QVBoxLayout(table_box)
        tl.setContentsMargins(0, 0, 0, 0)
        self.results_title = QLabel()  # "— model": a long name is cut, not a reason for the window to grow
        self.results_title.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        head = QHBoxLayout()
        head.addWidget(QLabel("<b>Results</b>"))  # always whole, at any font size
        head.addWidget(self.results_title, 1)
        head.addWidget(QLabel("recommend for"))
        self.target_kind = QComboBox()
        for kind, (what, _, unit, is_max) in TARGETS.items():
            self.target_kind.addItem(f"{what} {'≤' if is_max else '≥'} ({unit})", kind)
        narrow(self.target_kind, chars=12)  # the Results title keeps its room at larger fonts
        self.target_value = QDoubleSpinBox()
        self.target_value.setRange(0.0, 1e6)
        self.target_value.setDecimals(2)
        self.target_value.setValue(200.0)
        self.recommend_button = QPushButton("Recommend")
        self.recommend_button.setToolTip("Select the run to ship for this target, and say why")
        self.recommend_button.clicked.connect(self.recommend)
        for wdg in (self.target_kind, self.target_value, self.recommend_button):
            head.addWidget(wdg)
        tl.addLayout(head)
        self.recommendation = QLabel()
        self.recommendation.setWordWrap(True)
        self.recommendation.hide()
        tl.addWidget(self.recommendation)
        tl.addWidget(self.table)
        right.addWidget(table_box)
        right.addWidget(bottom)
        right.setStretchFactor(0, 2)
        right.setStretchFactor(1, 3)
        right.setSizes([300, 450])

        main = QSplitter(Qt.Horizontal)
        main.addWidget(left)
        main.addWidget(right)
        main.setStretchFactor(1, 1)
        main.setSizes([430, 1010])
        self.setCentralWidget(main)

        self.logs = QPlainTextEdit()
        self.logs.setReadOnly(True)
        self.logs.setMaximumBlockCount(5000)
        self.logs.setPlaceholderText("The worker's log appears here.")
        self.log_dock = QDockWidget("Worker log", self)
        self.log_dock.setObjectName("logs")
        self.log_dock.setWidget(self.logs)
        self.addDockWidget(Qt.BottomDockWidgetArea, self.log_dock)
        self.resizeDocks([self.log_dock], [80], Qt.Vertical)

        m = self.menuBar().addMenu("&File")
        for text, slot, key in (("Open model &folder…", self.model_panel.pick_folder, None),
                                ("Open .&gguf…", self.model_panel.pick_gguf, None),
                                ("&Open recipe…", self.open_recipe, QKeySequence.Open),
                                ("&Save recipe…", self.save_recipe, QKeySequence.Save),
                                ("Export &report…", self.save_report, "Ctrl+Shift+R"),
                                ("&Quit", self.close, QKeySequence.Quit)):
            a = QAction(text, self)
            a.triggered.connect(slot)
            if key is not None:
                a.setShortcut(key)
            m.addAction(a)
            if slot == self.open_recipe:
                m.addMenu(self.bundled_menu)
        self.teach = TeachPanel(list(self.techniques.groups))
        self.teach.larger_fonts.connect(self.set_larger_fonts)
        for name, g in self.techniques.groups.items():  # the explainer follows the technique just ticked
            g.toggled.connect(lambda on, n=name: on and self.teach.show_technique(n))
        self.teach_dock = QDockWidget("Teaching mode", self)
        self.teach_dock.setObjectName("teach")
        self.teach_dock.setWidget(self.teach)
        self.addDockWidget(Qt.RightDockWidgetArea, self.teach_dock)
        self.teach_dock.hide()
        self.teach_dock.visibilityChanged.connect(lambda on: self.teach_action.setChecked(on))
        view = self.menuBar().addMenu("&View")
        view.addAction(self.log_dock.toggleViewAction())
        self.teach_action = QAction("&Teaching mode", self, checkable=True)
        self.teach_action.setShortcut("Ctrl+T")
        self.teach_action.setToolTip("Explainers per technique and a guided lab with a checklist")
        self.teach_action.triggered.connect(self.set_teaching)
        view.addAction(self.teach_action)
        themes = view.addMenu("&Theme")
        self.theme_actions = {}
        group = QActionGroup(self)
        for mode in theme.MODES:
            a = QAction({"system": "Follow the &system", "light": "&Light", "dark": "&Dark"}[mode], self, checkable=True)
            a.triggered.connect(lambda _=False, m=mode: self.set_theme(m))
            group.addAction(a)
            themes.addAction(a)
            self.theme_actions[mode] = a
        run_menu = self.menuBar().addMenu("&Run")
        for text, slot, key in (("&Run the recipe", self.run, "Ctrl+Return"), ("&Cancel", self.cancel, "Ctrl+."),
                                ("&Load the selected run's recipe", lambda: self.load_run_recipe(), "Ctrl+L"),
                                ("&Export the selected run", lambda: self.export_panel._export_clicked(), "Ctrl+E"),
                                ("&Delete the selected run…", lambda: self.forget_run(self.table.selected_id()),
                                 None)):  # (Del in the table: a window-wide Del would eat the text fields')
            a = QAction(text, self)
            a.triggered.connect(slot)
            if key:
                a.setShortcut(key)
            run_menu.addAction(a)
        QApplication.instance().styleHints().colorSchemeChanged.connect(lambda *_: self.set_theme(self.theme))
        self.set_theme(self.store.get("theme", "system"))
        about_action = QAction("&About Squeeze Studio", self)
        about_action.triggered.connect(self.show_about)
        self.menuBar().addMenu("&Help").addAction(about_action)
        self._recipe_changed()

    # ------------------------------------------------------------------ messages

    def say(self, text: str, error: bool = False, details: str | None = None) -> None:
        """One line in the run bar (errors in red): expected errors never open a dialog. `details`: the
        tooltip, where the line is a summary of something longer."""
        self.message.setText(text.strip().splitlines()[0] if text.strip() else "")
        self.message.setToolTip(details or text)
        style = ERROR_STYLE if error else INFO_STYLE
        if self.message.styleSheet() != style:  # re-styling re-polishes the label: ~7 ms on a slow CPU
            self.message.setStyleSheet(style)

    # ------------------------------------------------------------------ model and settings

    def set_model(self, model_id: str) -> None:
        if not model_id:
            return
        self.model, self.model_ok = model_id, False
        self.model_panel.show_model(model_id)
        self.results_title.setText(f"— {self.model_panel.combo.currentText()}")
        self.results_title.setToolTip(self.model_panel.combo.currentText())  # the title is cut in a narrow window
        self.table.clearSelection()
        self.refresh()

    def _on_facts(self, model_id: str, info) -> None:
        self.model_ok = not isinstance(info, str)
        if not self.model_ok:
            self.say(info, error=True)
            return
        recent = [m for m in self.store.get("recent", []) if m != model_id]
        if model_id not in models.BUNDLED:
            self.store.set("recent", [model_id] + recent[:9])
        self.store.set("model", model_id)
        self._update_estimate()
        self.ensure_baseline()

    def _update_eval_key(self) -> bool:
        """The eval settings' key, or None and the reason said, for settings no job could run with (a text file
        that cannot be read, fewer tokens than one window): checked here, not by a baseline job that fails."""
        try:
            self.eval_key = self.eval_panel.settings().check().key()
            return True
        except SqueezeError as e:
            self.eval_key = None
            self.say(str(e), error=True)
            return False

    def _eval_changed(self) -> None:
        if self._update_eval_key():
            self.store.set("eval", self.eval_panel.settings().to_dict())
            self.say("")
        self.refresh()
        self.ensure_baseline()

    def _recipe_changed(self) -> None:
        try:
            r = self.recipe()
            # one numbered line per step, the technique in bold: the run-on label of a long recipe was unreadable
            lines = [f"{i}. <b>{html.escape(s.name)}</b> {html.escape(s.label()[len(s.name):].strip())}"
                     for i, s in enumerate(r.steps, 1)]
            self.recipe_label.setText("Recipe:<br>" + "<br>".join(lines) if r.steps
                                      else "Recipe: none ticked — the baseline is measured automatically")
            self.recipe_label.setStyleSheet(INFO_STYLE)
        except SqueezeError as e:
            self.recipe_label.setText(str(e))
            self.recipe_label.setStyleSheet(ERROR_STYLE)
        if hasattr(self, "estimate_label"):
            self._update_estimate()

    def recipe(self):
        """The panel's recipe (raises RecipeError)."""
        return recipes.from_data(self.techniques.recipe_data())

    def open_recipe(self, path: str | Path | None = None) -> None:
        """A recipe file, or a bundled recipe by id (bundled:NAME), into the panel."""
        if not path:
            path, _ = QFileDialog.getOpenFileName(self, "Open recipe", "", "Recipes (*.yaml *.yml *.json)")
            if not path:
                return
        path = str(path)
        try:
            # the list read at start, not the files again; an unknown bundled: id is load()'s error (nearest name)
            shipped = next((b for b in self.bundled_recipes if b.id == path), None)
            notes = self.techniques.set_recipe(shipped.recipe if shipped else recipes.load(path))
        except SqueezeError as e:
            self.say(str(e), error=True)
            return
        if shipped:
            # the measured figures in the run bar, the whole description in its tooltip: all of it took 7 lines
            measured = re.search(r"perplexity .*?(?=\.\s|\.?$)", shipped.description)
            notes_text = "".join(f" ({n})" for n in notes)
            self.say(f"Loaded “{shipped.name}”" + (f": {measured.group(0)}." if measured else ".") + notes_text,
                     details=f"{shipped.name}: {shipped.description}{notes_text}")
            first = next((g for g in self.techniques.groups.values() if g.isChecked()), None)
            if first is not None:  # its sliders in view, not wherever the settings were scrolled
                self.left_scroll.ensureWidgetVisible(first)
        else:
            self.say("; ".join(notes) if notes else f"Opened {Path(path).name}.")

    def confirm_forget(self, row: dict, exports: int) -> bool:
        """`row`: the table's row (its label says "↳ ONNX …" for an export)."""
        what = f"“{row['label']}”" + (f" and its {exports} export(s)" if exports else "")
        return QMessageBox.question(self, "Delete run", f"Delete {what}, with the files the app saved for it in the "
                                    "workspace? This cannot be undone.",
                                    QMessageBox.Yes | QMessageBox.No, QMessageBox.No) == QMessageBox.Yes

    def forget_run(self, run_id: str) -> None:
        """Deletes a run (Del, or the table's context menu): its row, its exports and their files in the
        workspace, after asking."""
        row = next((r for r in self.table.results.rows if r["id"] == run_id), None) if run_id else None
        if row is None:
            self.say("Select a run in the table to delete it.", error=True)
            return
        if self.client.running or self.queue:  # a queued export or a side-by-side may need its files
            self.say("Wait for the running job to finish, then delete.", error=True)
            return
        exports = sum(1 for r in self.runs if r.get("parent_id") == run_id)
        if not self.confirm_forget(row, exports):
            return
        try:
            _, freed = self.ledger.forget(run_id)
        except SqueezeError as e:
            self.say(str(e), error=True)
            return
        self.say(f"Deleted {row['label']}" + (f" and {len(freed)} saved folder(s)." if freed else "."))
        self.refresh()

    def load_run_recipe(self, run_id: str | None = None) -> None:
        """A past run's recipe into the panel (double click, or Ctrl+L on the selected row), to tweak it or add
        a step: a job then starts from that run's saved variant where its steps match (core.reuse)."""
        row = next((r for r in self.runs if r["id"] == run_id), None) if run_id else self.table.selected_row()
        if not row or row.get("kind") == "export" or row.get("export"):
            self.say("Select a run in the table to load its recipe.", error=True)
            return
        try:
            recipe = recipes.from_data(row["recipe"])
        except SqueezeError as e:
            self.say(str(e), error=True)
            return
        notes = self.techniques.set_recipe(recipe)
        ticked = [g for g in self.techniques.groups.values() if g.isChecked()]
        if ticked:  # bring the first ticked technique's sliders into view
            QTimer.singleShot(0, self, lambda g=ticked[0]: self.left_scroll.verticalScrollBar().setValue(
                max(0, g.mapTo(self.left_scroll.widget(), QPoint(0, 0)).y() - 24)))
        self.say("; ".join(notes) if notes else
                 f"Loaded the recipe of “{row['label']}”: change it or add a step, then Run.")

    def save_recipe(self, path: str | None = None) -> None:
        try:
            r = self.recipe()
        except SqueezeError as e:
            self.say(str(e), error=True)
            return
        if not path:
            path, _ = QFileDialog.getSaveFileName(self, "Save recipe", "recipe.yaml", "Recipes (*.yaml *.yml *.json)")
            if not path:
                return
        if not Path(path).suffix:  # a name typed without one: YAML, as the dialog offers first
            path += ".yaml"
        try:
            r.save(path)
        except SqueezeError as e:
            self.say(str(e), error=True)
            return
        self.say(f"Saved {Path(path).name}.")

    # ------------------------------------------------------------------ jobs

    def ensure_baseline(self, again: bool = False) -> None:
        """Queues the baseline of (model, eval settings) unless the ledger has it: it is measured
        once and cached there. One that failed is not queued again by itself (the window would retry
        it without end: each failed job re-reads the model's facts, which asks for the baseline); a
        click on Run (`again`) tries once more."""
        if not (self.auto_baseline and self.model_ok and self.eval_key):
            return
        if self.ledger.baseline(self.model, self.eval_key):
            return
        if again:
            self._failed_baselines.discard((self.model, self.eval_key))
        elif (self.model, self.eval_key) in self._failed_baselines:
            return
        if any(self._is_baseline_of_now(s) for s in [self.current, *self.queue] if s):
            return
        self.queue.insert(0, JobSpec(self.model, eval=self.eval_panel.settings().to_dict()))
        self._next()

    def _is_baseline_of_now(self, spec: JobSpec) -> bool:
        return _is_baseline(spec) and spec.model == self.model and spec.eval_key() == self.eval_key

    def run(self) -> None:
        if self.client.running:
            return
        try:
            r = self.recipe()
        except SqueezeError as e:
            self.say(str(e), error=True)
            return
        if not r.steps:
            self.say("Tick a technique first: the baseline is measured on its own.", error=True)
            return
        if not self._update_eval_key():
            return
        self.queue.append(JobSpec(self.model, recipe=r.to_dict(), eval=self.eval_panel.settings().to_dict()))
        self.ensure_baseline(again=True)  # when missing, it runs first
        self._next()

    def export_selected(self, out: str | None = None, quantize: str | None = None,
                        opset: int | None = None, graph: str = "fused") -> JobSpec | None:
        row = self.table.selected_row()
        if not row or row["status"] != "done" or row.get("export"):
            self.say("Select a finished run to export.", error=True)
            return None
        if self.client.running:
            self.say("Wait for the running job to finish.", error=True)
            return None
        spec = JobSpec(row["model"], recipe=row["recipe"], eval=row["eval"], kind="export", parent_id=row["id"])
        # by default a folder of its own (run, target, this export): a second export never writes into the first's;
        # a relative name goes there too, not into whatever folder the app was started from
        exports = paths.workspace_dir() / "exports"
        target = exports / Path(out).expanduser() if out else exports / f"{row['id']}-{quantize or 'fp32'}-{spec.job_id}"
        try:
            check_export_folder(target)  # a file, read-only or foreign folder: said now, no failed row
        except SqueezeError as e:
            self.say(str(e), error=True)
            return None
        out = str(target)
        spec.export = {"out": out, "quantize": quantize, "opset": opset, "graph": graph, "variant_dir": row["variant_dir"]}
        self.queue.append(spec)
        self._next()
        return spec

    def compare(self, reference_id: str, variant_id: str, prompt: str, new_tokens: int = 32) -> JobSpec | None:
        """Side-by-side generation of two finished runs, in the worker."""
        rows = {r["id"]: r for r in self.table.results.rows}
        ref, var = rows.get(reference_id), rows.get(variant_id)
        if not (ref and var):
            self.say("Pick two finished runs to compare.", error=True)
            return None
        if not prompt.strip():
            self.say("Type a prompt for both models to continue.", error=True)
            return None
        if self.client.running:
            self.say("Wait for the running job to finish.", error=True)
            return None
        spec = JobSpec(self.model, kind="compare", eval=ref["eval"] or self.eval_panel.settings().to_dict(),
                       compare={"prompt": prompt, "new_tokens": new_tokens,
                                "reference": {"label": ref["label"], "variant_dir": ref["variant_dir"]},
                                "variant": {"label": var["label"], "variant_dir": var["variant_dir"]}})
        self.queue.append(spec)
        self._next()
        return spec

    def set_teaching(self, on: bool) -> None:
        """Teaching mode: the explainer and lab dock (kept in the settings)."""
        self.teach_dock.setVisible(bool(on))
        self.teach_action.setChecked(bool(on))
        self.store.set("teach", bool(on))
        if on:
            self.teach.update_progress(self.ledger.rows(kinds=LAB_KINDS))

    def set_larger_fonts(self, on: bool) -> None:
        app = QApplication.instance()
        if not hasattr(self, "_base_font"):
            self._base_font = app.font()
        f = self._base_font.__class__(self._base_font)
        if on:
            f.setPointSizeF(self._base_font.pointSizeF() * 1.35)
        app.setFont(f)
        for wdg in self.findChildren(QWidget):  # a widget with a style sheet keeps its font when the app's changes
            if wdg.styleSheet():
                wdg.setFont(f)
        for view in (self.plot.view, self.weight_view.hist, self.weight_view.codes, self.weight_view.per_layer,
                     self.sensitivity_view.plot):
            font_plot(view, f)

    def set_theme(self, mode: str) -> None:
        """Light, dark, or following the system (kept in the settings)."""
        self.theme = mode if mode in theme.MODES else "system"
        self.dark = theme.apply(QApplication.instance(), self.theme)
        for view in (self.plot, self.weight_view, self.sensitivity_view, self.compare_view):
            view.set_dark(self.dark)
        for wdg in self.findChildren(QWidget):  # a "palette(...)" colour is resolved when its style is set
            if "palette(" in (sheet := wdg.styleSheet()):
                wdg.setStyleSheet("")
                wdg.setStyleSheet(sheet)
        self.theme_actions[self.theme].setChecked(True)
        self.store.set("theme", self.theme)

    # drag a model folder or a .gguf file onto the window to open it
    def dragEnterEvent(self, ev) -> None:
        if self._dropped_model(ev.mimeData()):
            ev.acceptProposedAction()

    def dropEvent(self, ev) -> None:
        path = self._dropped_model(ev.mimeData())
        if path:
            ev.acceptProposedAction()
            self.model_panel.add_models([path])
            self.set_model(path)

    @staticmethod
    def _dropped_model(mime) -> str | None:
        urls = [u.toLocalFile() for u in mime.urls() if u.isLocalFile()] if mime.hasUrls() else []
        if len(urls) != 1:
            return None
        p = Path(urls[0])
        return str(p) if p.is_dir() or p.suffix.lower() == ".gguf" else None

    def show_about(self):
        from .widgets.about import AboutDialog
        self.about_dialog = AboutDialog(self)
        self.about_dialog.open()
        return self.about_dialog

    def save_report(self, path: str | None = None) -> str | None:
        """The study (this model's runs) as one offline HTML file, or the ledger as CSV / JSON."""
        from core.report import write
        if not path:
            path, _ = QFileDialog.getSaveFileName(self, "Export the study", str(paths.workspace_dir() / "study.html"),
                                                  "HTML report (*.html);;CSV (*.csv);;JSON (*.json)")
        if not path:
            return None
        try:
            write(Path(path), self.ledger.rows(self.model))  # every kind of job
        except (OSError, SqueezeError) as e:
            self.say(f"cannot write the report: {e}", error=True)
            return None
        self.say(f"Report written to {path}")
        return path

    def recommend(self) -> dict | None:
        """Selects the run that best meets the target (table and plot) and says why in one line."""
        best, why = recommend(self.table.results.rows, self.target_kind.currentData(), self.target_value.value(),
                              self.eval_key)
        self.recommendation.setText(("✔ " if best else "✘ ") + why)
        self.recommendation.show()
        if best:
            self.table.select_id(best["id"])
        return best

    def scan_sensitivity(self, technique: str, setting: float, max_tokens: int) -> JobSpec | None:
        """The per-layer sensitivity map of the current model, in the worker."""
        if self.client.running:
            self.say("Wait for the running job to finish.", error=True)
            return None
        ev = dict(self.eval_panel.settings().to_dict(), max_tokens=max_tokens)
        spec = JobSpec(self.model, kind="sensitivity", eval=ev,
                       compare={"technique": technique, "setting": setting})
        self.queue.append(spec)
        self._next()
        return spec

    def exclude_module(self, technique: str, setting: float, path: str) -> None:
        """A clicked heat-map cell: tick the technique at the scanned setting, keep that Linear out."""
        g = self.techniques.groups[technique]
        g.setChecked(True)
        key = "bits" if technique == "rtn" else "sparsity"
        g.editors[key].set_value(int(setting) if key == "bits" else setting)
        ed = g.editors["exclude"]
        now = [p.strip() for p in str(ed.value() or "").split(",") if p.strip()]
        if path not in now:
            ed.set_value(", ".join(now + [path]))
        self._recipe_changed()
        self.say(f"{path} is kept out of {technique}: see the recipe.")

    def run_mixed_precision(self, allocation: dict) -> None:
        """The sensitivity map's allocation becomes the recipe (rtn; the chosen Linears at 8 bits) and runs."""
        try:
            recipe = recipes.from_data(allocation["recipe"])
        except SqueezeError as e:
            self.say(str(e), error=True)
            return
        self.techniques.set_recipe(recipe)
        self._recipe_changed()
        self.say(f"Mixed precision: {len(allocation['upgrade'])} Linears at 8 bits, the rest at "
                 f"{allocation['bits']} — running it.")
        self.run()

    def view_weights(self, run_id: str) -> JobSpec | None:
        """Weight histograms and per-layer bits / sparsity of a run's saved variant, in the worker."""
        row = next((r for r in self.table.results.rows if r["id"] == run_id), None)
        if not row or not row.get("variant_dir"):
            self.say("Pick a finished run with a recipe: the baseline has no variant to compare.", error=True)
            return None
        if self.client.running:
            self.say("Wait for the running job to finish.", error=True)
            return None
        spec = JobSpec(row["model"], kind="weights", eval=row["eval"] or self.eval_panel.settings().to_dict(),
                       compare={"variant_dir": row["variant_dir"], "label": row["label"]})
        self.queue.append(spec)
        self._next()
        return spec

    def _export_clicked(self, out: str, quantize, opset, graph: str) -> None:
        self.export_selected(out or None, quantize, opset, graph)

    def _next(self) -> None:
        if self.client.running or not self.queue:
            return
        spec = self.queue.pop(0)
        try:
            est = self.preflight(spec)
            if est:
                preflight.check(est, paths.workspace_dir())
        except PreflightError as e:  # refused before anything starts
            self.say(f"Not started: {e}", error=True)
            self.queue.clear()
            return
        self.client.start(spec, self.ledger)  # a failure to start arrives as an error event
        self.current = spec
        what = {"export": "Export", "compare": "Side by side", "weights": "Weights",
                "sensitivity": "Sensitivity scan"}.get(spec.kind) or (
            "Baseline" if not spec.recipe.get("steps") else "Run")
        if what == "Baseline":
            self.say("Measuring the baseline of this model once (cached for these eval settings)…")
        self._log(f"— {what}: {spec.model} · {self._job_subject(spec)} (job {spec.job_id})")
        self.progress.setValue(0)
        self.loss_curve.clear()
        self.stage_label.setText("starting the worker…")
        self._busy(True)
        self.later(0, self.refresh)  # its own slice of the event loop, after the worker's start

    @staticmethod
    def _job_subject(spec: JobSpec) -> str:
        """What a job works on, for its log line: the runs it compares or reads, else its recipe."""
        c = spec.compare or {}
        if spec.kind == "compare":
            return f"{c['reference']['label']} vs {c['variant']['label']}"
        if spec.kind == "weights":
            return c.get("label") or "weights"
        if spec.kind == "sensitivity":
            return f"{c.get('technique')} {c.get('setting', 0):g} on one Linear at a time"
        try:
            return recipes.from_data(spec.recipe).label()
        except SqueezeError:
            return "(invalid recipe)"  # the job fails with the reason

    def cancel(self) -> None:
        self.queue.clear()
        if self.client.running:
            self.client.cancel()
            self.stage_label.setText("cancelling…")
            self.cancel_button.setEnabled(False)

    def _busy(self, busy: bool) -> None:
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self.export_panel.button.setEnabled(self.export_panel.can_export and not busy)

    def _on_progress(self, e: dict) -> None:
        self.progress.setValue(int(e.get("fraction", 0) * 1000))
        note = e.get("note") or ""
        eta = fmt_eta(*shown_eta(e))
        text = f"{e.get('stage')} {e.get('stage_fraction', 0) * 100:.0f} %{eta}" + (f"  ·  {note}" if note else "")
        self.stage_label.setToolTip(text)
        self.stage_label.setText(self.stage_label.fontMetrics().elidedText(text, Qt.ElideRight,
                                                                           max(self.stage_label.width(), 80)))

    def _on_error(self, e: dict) -> None:
        message = e.get("message") or "the job failed"
        spec = self.current
        if spec is not None and _is_baseline(spec):
            self._failed_baselines.add((spec.model, spec.eval_key()))
        self.say(message, error=True)
        self._log(f"failed: {message}")  # the message line is replaced by the next one; the log keeps it

    def _on_metric(self, e: dict) -> None:
        self.loss_curve.add(e)

    def _on_log(self, e: dict) -> None:
        self._log(e.get("text", ""))

    def _log(self, text: str) -> None:
        self.logs.appendPlainText(text.rstrip())
        crash_log.info("%s", text.rstrip())  # the dock live, the log file for later

    def _on_result(self, e: dict) -> None:
        p = e.get("payload") or {}
        kind = self.current.kind if self.current else None
        view = {"sensitivity": self.sensitivity_view, "weights": self.weight_view, "compare": self.compare_view}.get(kind)
        if view is not None:
            view.show_result(p)
            # the switch repaints the whole view: a slice of its own, not on top of filling it
            self.later(10, lambda: self.views.setCurrentWidget(view))
        if kind == "sensitivity":
            self.say(f"Sensitivity scan done in {fmt_duration(p.get('seconds'))}")
        elif kind == "weights":
            self.say(f"Weights of {p.get('label')}: {len(p.get('layers', []))} layers")
        elif kind == "compare":
            self.say(f"Side by side: mean KL {p.get('mean_kl', 0):.3f}"
                     + ("" if p.get("first_diff") is None else f", first difference at token {p['first_diff'] + 1}"))
        elif kind == "export":
            self.say("Export verified." if p.get("ok", True) else f"Export failed verification: {p.get('failure')}",
                     error=not p.get("ok", True))
        else:
            self.say(f"Done: {p.get('label', '')} — perplexity {fmt_ppl(p.get('ppl')) or '—'}")

    def _on_finished(self, e: dict) -> None:
        done, self.current = self.current, None
        self.progress.setValue(0)
        self.stage_label.setText("idle")
        self._busy(False)
        self.refresh()
        if done is not None and done.kind not in ("compare", "weights", "sensitivity"):
            # selecting shows the run's export panel (for an export, its verified numbers): a slice of its own
            run_id = done.parent_id if done.kind == "export" else done.job_id
            self.later(15, lambda: self.table.select_id(run_id))
        if self.model_panel.info is not None and self.model_panel.info.params is None:
            self.model_panel.refresh_facts()  # the first job converted the model
        self.later(0, self._next)  # the next job starts in a later slice: no long stall

    # ------------------------------------------------------------------ results

    def later(self, ms: int, fn) -> None:
        """Runs `fn` in a later slice of the event loop (keeping each slice of GUI work short);
        `settled` stays False until it has run."""
        self._later += 1

        def run():
            self._later -= 1
            fn()
        # never 0: a 0 ms single shot is a posted event, run in the same batch as the repaint of what the
        # slice before it changed (one long stretch); a timer runs in a pass of its own
        QTimer.singleShot(max(ms, 1), self, run)

    @property
    def settled(self) -> bool:
        """No job running or queued, and no deferred GUI work pending."""
        return not self.client.running and not self.queue and not self._later

    def refresh(self) -> None:
        """Reloads the current model's runs from the ledger (and again every 2 s while a job left
        running by an earlier window, in the background, has not finished)."""
        # the table's kinds only: re-reading the analysis jobs' results held the GUI thread ~30 ms per refresh
        self.runs = self.ledger.rows(self.model, kinds=("eval", "export")) if self.model else []
        mine = self.current.job_id if self.current else None
        if any(r["status"] == "running" and r["id"] != mine for r in self.runs):
            QTimer.singleShot(2000, self.refresh)
        rows = table_rows(self.runs)
        shown, self._shown = self._shown, (self.model, self.eval_key, rows)
        if shown == self._shown:  # e.g. after an analysis job (not a table row): nothing to redraw
            self.later(0, lambda: self._refresh_views(None))
            return
        self.table.set_rows(rows, self.eval_key)
        # the plot and the other views in a slice of their own: with the table's, and the repaint of
        # both, one slice held the GUI thread past 40 ms on a slow CPU
        self.later(0, lambda: self._refresh_views(rows))

    def _refresh_views(self, rows: list[dict] | None) -> None:
        """`rows`: the table's new rows for the plot and the views; None when they did not change."""
        if rows is not None:
            self.plot.set_rows(rows, self.eval_key)
            self.compare_view.set_rows(rows)
            self.weight_view.set_rows(rows)
        if hasattr(self, "teach") and self.teach_dock.isVisible():
            self.teach.update_progress(self.ledger.rows(kinds=LAB_KINDS))  # every model's runs count for the lab
        self._row_selected(self.table.selected_id())

    RERUNNABLE = ("interrupted", "failed", "cancelled")

    def preflight(self, spec: JobSpec) -> dict:
        """The job's RAM / disk / time estimate (plain Python, quick: safe on the GUI thread)."""
        if spec.kind not in ("eval", "export"):
            return {}
        info = self.model_panel.info if spec.model == self.model and self.model_panel.info is not None else None
        try:
            return preflight.for_spec(spec, info, history=self.runs)
        except SqueezeError:
            return {}

    def _update_estimate(self) -> None:
        """The estimate of the ticked recipe, next to the Run button."""
        try:
            spec = JobSpec(self.model, recipe=self.recipe().to_dict(), eval=self.eval_panel.settings().to_dict())
        except SqueezeError:
            self.estimate_label.setText("")
            return
        est = self.preflight(spec) if self.model else {}
        self.estimate_label.setText("" if not est else
                                    f"estimate: ≈ {est['ram_bytes'] / 1e9:.1f} GB RAM, ≈ {fmt_duration(est['seconds'])}"
                                    + (f" (learned from {est['history_runs']} run{'s' if est['history_runs'] > 1 else ''})"
                                       if est.get("history_runs") else "")
                                    + (f"; {_steps_saved(est['reused'])} already saved" if est.get("reused") else ""))

    def rerun_selected(self) -> JobSpec | None:
        """One click: the selected run that did not finish, again, with its own recipe and eval settings."""
        row = self.table.selected_row()
        if not row or row["status"] not in self.RERUNNABLE or row.get("export"):
            self.say("Select an interrupted, failed or cancelled run to run it again.", error=True)
            return None
        spec = JobSpec(row["model"], recipe=row["recipe"], eval=row["eval"] or self.eval_panel.settings().to_dict())
        key = spec.eval_key()
        if (self.auto_baseline and not self.ledger.baseline(spec.model, key)
                and not any(_is_baseline(s) and s.model == spec.model and s.eval_key() == key
                            for s in [self.current, *self.queue] if s)):
            # its own eval settings may not be today's: their baseline first, or it has no Δ ppl, no × smaller
            self.queue.append(JobSpec(spec.model, eval=spec.eval))
        self.queue.append(spec)
        self._next()
        return spec

    def _row_selected(self, run_id: str) -> None:
        self.plot.select(run_id)
        row = self.table.selected_row()
        self.rerun_button.setEnabled(bool(row and row["status"] in self.RERUNNABLE and not row.get("export")
                                          and not self.client.running))
        picked = next((r for r in self.runs if r["id"] == run_id), None)
        if picked and picked["kind"] == "export":  # an export's own row: its numbers
            export = picked
        else:
            exports = [r for r in self.runs if r["kind"] == "export" and r["parent_id"] == run_id]
            export = exports[-1] if exports else None
        self.export_panel.show_run(self.table.selected_row(), export, self.client.running)

    def _point_clicked(self, run_id: str) -> None:
        self.table.select_id(run_id)

    # ------------------------------------------------------------------ closing

    CLOSE_CHOICES = ("cancel", "background", "stay")

    def ask_on_close(self) -> str:
        """A job runs and the window closes: cancel it, keep it running in the background, or stay."""
        box = QMessageBox(QMessageBox.Question, "A job is running",
                          "A job is still running. Cancel it, or let it finish in the background? (Its row in "
                          "the ledger is completed either way; the next start shows the result.)", parent=self)
        cancel = box.addButton("Cancel the job and quit", QMessageBox.DestructiveRole)
        keep = box.addButton("Keep it running in the background", QMessageBox.AcceptRole)
        box.addButton("Don't quit", QMessageBox.RejectRole)
        box.exec()
        return {cancel: "cancel", keep: "background"}.get(box.clickedButton(), "stay")

    def closeEvent(self, ev) -> None:
        if self.client.running and self.client.job is not None:
            choice = self.ask_on_close()
            if choice == "stay":
                ev.ignore()
                return
            self.queue.clear()
            if choice == "background":
                self.client.wait_started()
                self.client.job.detach()
                crash_log.info("job %s left running in the background", self.current and self.current.job_id)
            else:
                self.client.cancel()
                self.client.job.wait(3)
        self.queue.clear()
        self.store.q.setValue("geometry", self.saveGeometry())
        super().closeEvent(ev)


def _is_baseline(spec: JobSpec) -> bool:
    """An evaluation of the model as it is (no recipe)."""
    return spec.kind == "eval" and not spec.recipe.get("steps")
