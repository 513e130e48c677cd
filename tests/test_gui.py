"""The window, clicked through as a user (pytest-qt, headless), on the tiny random Llama with
fast eval settings and a fresh SQUEEZE_HOME. Jobs run in the real worker process."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PySide6.QtCore import QPointF, Qt, QUrl

from core import paths
from core.ledger import Ledger
from core.results import COLUMNS
from gui.main_window import MainWindow

JOB_MS = 90_000  # a tiny job takes ~3 s; generous for a loaded CI machine


@pytest.fixture
def open_window(qtbot, home, tiny_model, tiny_eval):
    """open_window(**kw) -> a shown MainWindow on the tiny model; closed (job killed) afterwards."""
    made = []

    def make(**kw):
        kw.setdefault("model", tiny_model)
        kw.setdefault("eval_settings", tiny_eval)
        w = MainWindow(**kw)
        w.ask_on_close = lambda: "cancel"  # a test that closes a busy window says what it wants
        qtbot.addWidget(w)
        w.show()
        qtbot.waitExposed(w)
        made.append(w)
        return w

    yield make
    for w in made:  # the window may be gone (pytest-qt closes it first): ask the job itself
        w.queue.clear()
        job = w.client.job
        if job is not None and job.running:
            w.client.wait_started()
            job.kill()
            assert job.wait(10), "the worker did not stop"


def wait_idle(qtbot, w, timeout=JOB_MS):
    qtbot.waitUntil(lambda: w.settled, timeout=timeout)


def rows_by_label(w) -> dict:
    return {r["label"]: r for r in w.table.results.rows}


def wait_baseline(qtbot, w):
    qtbot.waitUntil(lambda: any(r["baseline"] and r["status"] == "done" for r in w.table.results.rows),
                    timeout=JOB_MS)
    wait_idle(qtbot, w)


def window_with_run(qtbot, open_window, steps: list):
    """A window whose baseline and one run of `steps` (set through the technique panel) are done."""
    from core.recipe import from_data
    w = open_window()
    wait_baseline(qtbot, w)
    w.techniques.set_recipe(from_data({"steps": steps}))
    w.run()
    wait_idle(qtbot, w)
    return w


def click_point(qtbot, w, run_id):
    """A real mouse click on the plot point of `run_id`."""
    qtbot.wait(100)  # let the plot settle its auto-range, as a user would see it
    p = w.plot.point_of(run_id)
    assert p is not None, f"no plot point for {run_id}"
    y = math.log10(p["y"]) if w.plot.log_y else p["y"]
    view = w.plot.view
    scene_pos = view.getPlotItem().vb.mapViewToScene(QPointF(p["x"], y))
    qtbot.mouseClick(view.viewport(), Qt.LeftButton, pos=view.mapFromScene(scene_pos))


def test_the_qt_binding_keeps_its_references(qtbot):
    # PySide6 6.12.0 on CPython 3.11 dropped a reference to None on every void call and to True on
    # every emit(): a window aborts after some thousand updates. (3.12+ objects are immortal.)
    from PySide6.QtCore import QObject, Signal
    from PySide6.QtWidgets import QLabel

    class Emitter(QObject):
        changed = Signal(dict)

    label, emitter = QLabel(), Emitter()
    qtbot.addWidget(label)
    nones, trues = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(500):
        label.setText("x")
        emitter.changed.emit({})
    assert sys.getrefcount(None) > nones - 100 and sys.getrefcount(True) > trues - 100


def test_baseline_then_run_a_recipe_then_plot_and_table_agree(qtbot, open_window, tiny_model):
    w = open_window()
    # facts of the model, read off the GUI thread
    qtbot.waitUntil(lambda: w.model_panel.fact_labels["layers"].text() == "2", timeout=10_000)
    assert w.model_panel.fact_labels["params"].text().endswith("k")
    # the baseline is measured on its own, once
    wait_baseline(qtbot, w)
    base = rows_by_label(w)["baseline"]
    assert base["ppl"] > 1 and base["delta_ppl_pct"] == pytest.approx(0.0)
    assert w.run_button.isEnabled() and not w.cancel_button.isEnabled()

    # tick rtn, move its bits slider with the keyboard, pick per-channel groups
    rtn = w.techniques.groups["rtn"]
    rtn.setChecked(True)
    bits = rtn.editors["bits"]
    bits.slider.setFocus()
    for _ in range(4):
        qtbot.keyClick(bits.slider, Qt.Key_Right)
    assert bits.value() == 8 and bits.box.text() == "8 bits"
    groups = rtn.editors["group_size"].combo
    groups.setCurrentIndex(groups.findText("per-channel"))
    import re
    shown = re.sub(r"<[^>]+>", "", w.recipe_label.text())  # what the label shows, without its markup
    assert "1. rtn bits=8 group_size=per-channel" in shown
    assert bits.slider.toolTip().startswith("Bits per weight")

    qtbot.mouseClick(w.run_button, Qt.LeftButton)
    assert not w.run_button.isEnabled() and w.cancel_button.isEnabled()  # one job at a time
    qtbot.waitUntil(lambda: w.progress.value() > 0 or not w.client.running, timeout=JOB_MS)
    wait_idle(qtbot, w)
    assert w.run_button.isEnabled() and not w.cancel_button.isEnabled()
    row = rows_by_label(w)["rtn bits=8 group_size=per-channel symmetric"]
    assert row["status"] == "done" and row["ppl"] > 1
    assert row["delta_ppl_pct"] is not None and row["x_smaller"] > 1.5
    assert "Done" in w.message.text()
    assert "applying rtn" in w.logs.toPlainText()

    # one point per measured run; the baseline is marked; a Pareto front is drawn
    assert {p["id"] for p in w.plot.points} == {base["id"], row["id"]}
    assert [p["baseline"] for p in w.plot.points if p["id"] == base["id"]] == [True]
    assert w.plot.front and len(w.plot.front_line.getData()[0]) == len(w.plot.front)

    # clicking a point selects its row; selecting a row rings its point
    w.table.select_id(row["id"])
    assert w.plot.selected == row["id"]
    click_point(qtbot, w, base["id"])
    qtbot.waitUntil(lambda: w.table.selected_id() == base["id"], timeout=5_000)
    assert w.plot.selected == base["id"]
    w.plot.set_axis("decode")  # the other view of the same runs
    assert {p["id"] for p in w.plot.points} == {base["id"], row["id"]}
    click_point(qtbot, w, row["id"])
    qtbot.waitUntil(lambda: w.table.selected_id() == row["id"], timeout=5_000)

    # close and reopen: the runs come back from the ledger, no second baseline
    w.close()
    w2 = open_window()
    assert {r["id"] for r in w2.table.results.rows} == {base["id"], row["id"]}
    assert not w2.client.running


def test_plot_switches_to_log_scale_for_broken_variants(qtbot):
    from core.results import table_rows
    from gui.widgets.results_table import ResultsTable
    from gui.widgets.tradeoff_plot import TradeoffPlot

    def run(id, steps, ppl, size, status="done"):
        return {"id": id, "kind": "eval", "model": "m", "eval_key": "k", "status": status, "label": id,
                "recipe": {"steps": steps}, "created": len(id), "error": None if status == "done" else "x",
                "result": {"ppl": ppl, "size_bytes": size, "decode_tokens_per_s": 10.0} if ppl else None}

    rows = table_rows([run("base", [], 20.0, 4e8), run("q2", [{"technique": "rtn"}], 9000.0, 6e7),
                       run("q4", [{"technique": "rtn"}], 23.0, 1e8), run("gone", [{"technique": "rtn"}], None, None,
                                                                         "interrupted")])
    plot, table = TradeoffPlot(), ResultsTable()
    qtbot.addWidget(plot)
    qtbot.addWidget(table)
    plot.set_rows(rows, "k")
    table.set_rows(rows, "k")
    assert plot.log_y and set(plot.front) == {"base", "q4", "q2"}
    plot.select("q2")
    assert plot.ring_text.pos().y() == pytest.approx(math.log10(9000.0))
    assert table.results.rowCount() == 4
    i = table.results.row_of("gone")
    assert table.results.index(i, 0).data() == "interrupted"
    table.select_id("q4")
    assert table.selected_row()["label"] == "q4"
    table.set_rows(rows[:3], "other-key")  # other eval settings: shown grey, selection kept
    assert table.selected_id() == "q4"


def test_invalid_recipe_shows_its_message_and_runs_nothing(qtbot, open_window):
    w = open_window(auto_baseline=False)
    w.techniques.groups["rtn"].setChecked(True)
    w.techniques.groups["dynamic_int8"].setChecked(True)  # two packing quantizers
    assert "cannot follow" in w.recipe_label.text()
    qtbot.mouseClick(w.run_button, Qt.LeftButton)
    assert "cannot follow" in w.message.text() and not w.client.running
    w.techniques.groups["rtn"].setChecked(False)
    w.techniques.groups["dynamic_int8"].setChecked(False)
    qtbot.mouseClick(w.run_button, Qt.LeftButton)
    assert "Tick a technique" in w.message.text() and not w.client.running


def test_eval_settings_no_job_could_use_are_said_at_once_and_queue_nothing(qtbot, open_window, tmp_path):
    w = open_window()  # the baseline is measured automatically: a bad setting must not start (and fail) one
    wait_idle(qtbot, w)
    rows = len(w.ledger.rows())
    w.eval_panel.max_tokens.setValue(100)  # less than one window of context 128 (applied after a short pause)
    qtbot.waitUntil(lambda: "less than one window" in w.message.text(), timeout=5_000)
    assert not w.client.running and not w.queue
    w.techniques.groups["rtn"].setChecked(True)
    qtbot.mouseClick(w.run_button, Qt.LeftButton)
    assert "less than one window" in w.message.text() and not w.client.running and not w.queue
    w.eval_panel.max_tokens.setValue(512)
    w.eval_panel.text.setText(str(tmp_path / "gone.txt"))
    w.eval_panel.text.editingFinished.emit()
    qtbot.waitUntil(lambda: "gone.txt" in w.message.text(), timeout=5_000)
    assert not w.client.running and not w.queue
    qtbot.mouseClick(w.run_button, Qt.LeftButton)
    assert "gone.txt" in w.message.text() and not w.client.running and not w.queue
    assert len(w.ledger.rows()) == rows  # no failed row left behind


def test_recipe_files_round_trip_through_the_panel(qtbot, open_window, tmp_path):
    w = open_window(auto_baseline=False)
    prune = w.techniques.groups["magnitude_prune"]
    prune.setChecked(True)
    prune.editors["sparsity"].slider.setValue(prune.editors["sparsity"].slider.value() + 3)  # 0.5 -> 0.65
    assert prune.editors["sparsity"].box.text() == "65 %"
    w.techniques.groups["rtn"].setChecked(True)
    f = tmp_path / "r.yaml"
    w.save_recipe(str(f))
    assert "magnitude_prune" in f.read_text() and "0.65" in f.read_text()
    for g in w.techniques.groups.values():
        g.setChecked(False)
    w.open_recipe(str(f))
    # an opened recipe shows the sliders of what it ticks, and only those
    assert prune.body.isVisible() and w.techniques.groups["rtn"].body.isVisible()
    assert not w.techniques.groups["wanda"].body.isVisible()
    from PySide6.QtWidgets import QToolButton  # a calibration text is a file: typed or picked
    assert w.techniques.groups["wanda"].editors["calib_text"].findChild(QToolButton) is not None
    assert w.techniques.groups["rtn"].editors["exclude"].findChild(QToolButton) is None
    assert w.recipe().to_dict() == {"steps": [
        {"technique": "magnitude_prune", "sparsity": 0.65, "scope": "per-layer", "exclude": ""},
        {"technique": "rtn", "bits": 4, "group_size": 64, "symmetric": True, "lm_head": False, "exclude": "",
         "upgrade_8bit": ""}]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - technique: rnt\n")
    w.open_recipe(str(bad))
    assert "did you mean 'rtn'" in w.message.text()


def test_a_bundled_recipe_chosen_from_the_list_fills_the_panel_and_says_what_it_measured(qtbot, open_window):
    from core.recipe import bundled_recipe
    w = open_window(auto_baseline=False)
    shipped = bundled_recipe("bundled:layers-25-distill")
    w.techniques.groups["gptq"].setChecked(True)  # what the user had ticked goes
    menu = w.bundled_button.menu()
    action = next(a for a in menu.actions() if a.data() == shipped.id)
    assert action.text() == shipped.name and "1.461×" in action.toolTip()
    action.trigger()
    assert w.recipe() == shipped.recipe  # both steps ticked with the recipe's values, the prune before distill
    assert w.techniques.groups["distill"].body.isVisible() and not w.techniques.groups["gptq"].isChecked()
    assert shipped.name in w.message.text() and "1.461×" in w.message.text()
    # the same menu under File; a wheel turned over the button (in the scrolling settings) loads nothing
    file_menu = next(a.menu() for a in w.menuBar().actions() if a.text() == "&File")
    assert any(a.menu() is menu for a in file_menu.actions())
    from PySide6.QtCore import QPoint
    from PySide6.QtGui import QWheelEvent
    from PySide6.QtWidgets import QApplication
    before = w.recipe()
    QApplication.sendEvent(w.bundled_button, QWheelEvent(QPointF(5, 5), QPointF(5, 5), QPoint(0, 0), QPoint(0, -120),
                                                          Qt.NoButton, Qt.NoModifier, Qt.NoScrollPhase, False))
    assert w.recipe() == before
    next(a for a in menu.actions() if a.data() == "bundled:rtn-4bit").trigger()
    assert [s.name for s in w.recipe().steps] == ["rtn"]


def test_a_model_that_is_not_a_model_gets_a_message_and_no_job(qtbot, open_window, tmp_path):
    (tmp_path / "not-a-model").mkdir()
    w = open_window(model=str(tmp_path / "not-a-model"))
    qtbot.waitUntil(lambda: "config.json" in w.message.text(), timeout=10_000)
    assert not w.client.running and not w.queue
    assert w.message.styleSheet().startswith("color: #c62828")


def test_cancel_stops_a_long_job_within_two_seconds(qtbot, open_window, tiny_eval):
    # a baseline that runs for a minute: the decode benchmark repeated many times
    long_eval = dict(tiny_eval, new_tokens=64, repeats=2000)
    w = open_window(eval_settings=long_eval)
    qtbot.waitUntil(lambda: w.client.running, timeout=10_000)
    qtbot.waitUntil(lambda: w.stage_label.text().startswith("evaluate"), timeout=JOB_MS)
    assert "ETA" in w.stage_label.text()
    job_id = w.current.job_id
    t0 = time.monotonic()
    qtbot.mouseClick(w.cancel_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.client.running, timeout=5_000)
    assert time.monotonic() - t0 < 2.0
    assert Ledger().get(job_id)["status"] == "cancelled"
    assert rows_by_label(w)["baseline"]["status"] == "cancelled"
    assert w.run_button.isEnabled() and w.message.text() == "Cancelled."


def test_a_failing_baseline_says_why_once_and_is_not_retried_without_end(qtbot, home, open_window):
    # the converted-model cache is a link to a drive that is not mounted: the bundled model cannot be
    # converted, so its baseline fails; each failed job re-read the model's facts, which queued the
    # baseline again (hundreds of failed rows in minutes)
    link = home / "cache" / "models"
    link.unlink()
    link.symlink_to(home / "unplugged-drive" / "models", target_is_directory=True)
    w = open_window(model="bundled:smollm2-135m")
    baselines = lambda: [r for r in w.ledger.rows(kinds=("eval",)) if r["label"] == "baseline"]  # noqa: E731
    qtbot.waitUntil(lambda: any(r["status"] == "failed" for r in baselines()), timeout=JOB_MS)
    wait_idle(qtbot, w)
    qtbot.wait(3000)  # the loop queued a new baseline within a second of each failure
    assert [r["status"] for r in baselines()] == ["failed"]
    assert not w.queue and not w.client.running
    assert "unplugged-drive" in w.message.toolTip() and "which does not exist" in w.message.toolTip()
    assert "Traceback" not in w.message.toolTip() and "FileExistsError" not in w.message.toolTip()
    # Run is a click: it tries the baseline once more (then the run itself), and stops again
    from core.recipe import from_data
    w.techniques.set_recipe(from_data({"steps": [{"technique": "rtn", "bits": 8}]}))
    w.run()
    qtbot.waitUntil(lambda: len(baselines()) == 2, timeout=JOB_MS)
    wait_idle(qtbot, w)
    qtbot.wait(2000)
    assert [r["status"] for r in baselines()] == ["failed", "failed"]
    assert not w.queue and not w.client.running


def test_killing_the_worker_marks_the_run_failed_and_the_app_goes_on(qtbot, open_window):
    w = open_window()
    wait_baseline(qtbot, w)
    base_id = rows_by_label(w)["baseline"]["id"]
    prune = w.techniques.groups["magnitude_prune"]
    prune.setChecked(True)
    qtbot.mouseClick(w.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: w.progress.value() > 0 or w.stage_label.text().startswith("load"), timeout=JOB_MS)
    killed = w.current.job_id
    os.kill(w.client.pid, signal.SIGKILL)
    wait_idle(qtbot, w)
    rows = {r["id"]: r for r in w.table.results.rows}
    assert rows[killed]["status"] == "failed" and "died" in rows[killed]["error"]
    row = [r["id"] for r in w.table.results.rows].index(killed)  # the reason beside the recipe, not off-screen
    recipe_cell = w.table.results.index(row, [c.key for c in COLUMNS].index("label")).data()
    assert recipe_cell.startswith("magnitude_prune") and "died" in recipe_cell
    assert rows[base_id]["status"] == "done"  # earlier rows kept
    assert "died" in w.message.text() and w.run_button.isEnabled()
    assert "failed: " in w.logs.toPlainText() and "died" in w.logs.toPlainText()  # kept after the next message
    assert killed not in {p["id"] for p in w.plot.points}

    # the window still works: one click runs the failed run again, to the end
    w.table.select_id(killed)
    assert w.rerun_button.isEnabled()
    qtbot.mouseClick(w.rerun_button, Qt.LeftButton)
    wait_idle(qtbot, w)
    done = [r for r in w.table.results.rows if r["label"].startswith("magnitude_prune") and r["status"] == "done"]
    assert len(done) == 1 and done[0]["nonzero_params"] < rows[base_id]["nonzero_params"]
    assert Ledger().get(killed)["status"] == "failed"


def test_export_the_selected_run_and_show_the_verified_numbers(qtbot, open_window, tmp_path):
    w = open_window()
    wait_baseline(qtbot, w)
    base = rows_by_label(w)["baseline"]
    w.table.select_id(base["id"])
    assert w.export_panel.button.isEnabled()
    (tmp_path / "a-file").write_text("x")  # a folder it cannot write into: said at once, no job, no failed row
    assert w.export_selected(out=str(tmp_path / "a-file" / "sub")) is None
    assert "is a file" in w.message.text() and not w.queue and not w.client.running
    start, w._next = w._next, lambda: None  # queued, not started: a relative name lands under the workspace's
    spec = w.export_selected(out="for-the-pi")  # exports, not in the folder the app was started from
    w._next = start
    assert w.queue.pop() is spec and Path(spec.export["out"]) == paths.workspace_dir() / "exports" / "for-the-pi"
    w.export_panel.quantize.setCurrentIndex(w.export_panel.quantize.findData("int4"))
    assert "MB" in w.export_panel.estimate.text() and "estimate" in w.export_panel.estimate.text()
    out = tmp_path / "onnx"
    w.export_panel.out.setText(str(out))
    w.export_panel.quantize.setCurrentIndex(w.export_panel.quantize.findData(None))
    w.export_panel.graph.setCurrentIndex(w.export_panel.graph.findData("portable"))
    qtbot.mouseClick(w.export_panel.button, Qt.LeftButton)
    assert not w.export_panel.button.isEnabled() and not w.run_button.isEnabled()
    wait_idle(qtbot, w, timeout=300_000)
    exports = [r for r in Ledger().rows() if r["kind"] == "export"]
    assert len(exports) == 1 and exports[0]["parent_id"] == base["id"]
    assert exports[0]["status"] == "done", exports[0]["error"]
    res = exports[0]["result"]
    assert Path(res["path"]).is_file() and res["ppl_onnx"] > 1 and res["ppl_torch"] == pytest.approx(base["ppl"])
    assert w.table.selected_id() == base["id"]  # the exported run stays selected
    shown = w.export_panel.numbers.text()
    assert "onnxruntime" in shown or "verification failed" in shown
    assert "perplexity" in shown and "decode tok/s" in shown and "file MB" in shown
    assert "memory bound" in shown and "prompts identical" in shown
    assert exports[0]["settings"]["export"]["graph"] == "portable"  # the panel's choice reaches the job
    assert "graph: optimum-onnx traced" in shown and "portable graph was asked for" in shown
    # the export is its own row, right under the run it came from, with onnxruntime's numbers
    ids = [r["id"] for r in w.table.results.rows]
    erow = w.table.results.rows[ids.index(exports[0]["id"])]
    assert ids.index(exports[0]["id"]) == ids.index(base["id"]) + 1 and erow["label"].startswith("↳ ONNX fp32")
    assert erow["ppl"] == res["ppl_onnx"] and erow["decode_tokens_per_s"] == res["decode_tokens_per_s_onnx"]
    assert erow["roofline_fraction"] == pytest.approx(res["roofline_fraction"])
    w.table.select_id(exports[0]["id"])  # selecting it shows its numbers; an export is not exported again
    assert not w.export_panel.button.isEnabled() and "memory bound" in w.export_panel.numbers.text()


def _studio(*args, env_home: Path, screen: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", SQUEEZE_HOME=str(env_home))
    if not screen:  # a server or a container: no display of any kind
        for k in ("QT_QPA_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY"):
            env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "gui.app", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=Path(__file__).resolve().parent.parent)


def test_screenshot_command_writes_a_png(home, tmp_path):
    shot = tmp_path / "shot.png"
    r = _studio("--screenshot", str(shot), env_home=home)
    assert r.returncode == 0, r.stderr
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PySide6.QtGui import QImage
    img = QImage(str(shot))
    assert img.width() >= 1200 and img.height() >= 800


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a machine without a screen is a Linux server")
def test_without_a_screen_the_window_says_so_and_a_screenshot_still_renders(home, tmp_path):
    r = _studio(env_home=home, screen=False)  # Qt alone would abort with a core dump
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "no screen" in r.stderr and "squeeze --help" in r.stderr
    shot = tmp_path / "shot.png"
    r = _studio("--screenshot", str(shot), env_home=home, screen=False)
    assert r.returncode == 0, r.stderr
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_gui_process_never_imports_torch(home):
    # the window stays responsive because model work happens in the worker process only
    code = ("import sys; from PySide6.QtWidgets import QApplication; app = QApplication([]);"
            "from gui.main_window import MainWindow; w = MainWindow(auto_baseline=False); w.show(); app.processEvents();"
            "import time; time.sleep(1); app.processEvents();"
            "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules));"
            "w.close()")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", SQUEEZE_HOME=str(home))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_screenshot_errors_exit_non_zero_with_one_line(home, tmp_path):
    r = _studio("--screenshot", str(tmp_path / "no-such-dir" / "shot.png"), env_home=home)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr
    r = _studio("--model", str(tmp_path / "missing"), "--screenshot", str(tmp_path / "x.png"), env_home=home)
    assert r.returncode == 2 and not (tmp_path / "x.png").exists()
    assert len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr
    r = _studio("--version", env_home=home)
    assert r.returncode == 0 and r.stdout.startswith("squeeze-studio ")


def test_techniques_come_in_families_with_their_sliders_shown_when_ticked(qtbot):
    from PySide6.QtWidgets import QLabel

    from core.techniques import all_techniques
    from core.techniques.base import FAMILY_HELP
    from gui.widgets.technique_panel import TechniquePanel
    panel = TechniquePanel()
    qtbot.addWidget(panel)
    panel.show()
    heads = [w.text() for w in panel.findChildren(QLabel) if w.text().startswith("<b>")]
    families = {t.family for t in all_techniques()}
    assert len(heads) == len(families)  # one header per family present
    assert all(any(FAMILY_HELP[f] in h for h in heads) for f in families)
    g = panel.groups["gptq"]
    assert not g.body.isVisible()
    assert g.summary.isEnabled()  # an unticked technique's summary reads as text, not greyed out
    g.setChecked(True)
    assert g.body.isVisible() and g.editors["bits"].isVisible()
    assert panel.recipe_data()["steps"][0]["technique"] == "gptq"


def test_ticked_techniques_make_a_recipe_that_runs_in_a_working_order(qtbot):
    """Ticking sparsegpt and distill heals the pruned model (not the reverse); structured_prune with low_rank and
    early_exit with distill, which the panel lists in the other order, give recipes the engine accepts."""
    from core.recipe import from_data, of
    from gui.widgets.technique_panel import TechniquePanel
    panel = TechniquePanel()
    qtbot.addWidget(panel)
    for ticked, expected in ((("distill", "sparsegpt"), ["sparsegpt", "distill"]),
                             (("low_rank", "structured_prune"), ["structured_prune", "low_rank"]),
                             (("early_exit", "distill", "gptq"), ["distill", "gptq", "early_exit"])):
        for g in panel.groups.values():
            g.setChecked(g.technique.name in ticked)
        data = panel.recipe_data()
        assert [s["technique"] for s in data["steps"]] == expected
        from_data(data)  # a valid composition
    # a recipe file in another valid order is shown with a note saying the order the panel will run
    notes = panel.set_recipe(of("kv_quant", "gptq"))
    assert any("gptq → kv_quant" in n for n in notes)
    assert any("kv_quant → kv_window" in n for n in panel.set_recipe(of("kv_window", "kv_quant")))
    assert panel.set_recipe(of("sparsegpt", "distill")) == []
    twice = panel.set_recipe(of(("kv_quant", {"bits": 8}), "kv_quant"))
    assert twice == ["kv_quant appears twice; the panel keeps the last"]


def test_slider_values_read_as_numbers_with_short_units(qtbot):
    from core.techniques import all_techniques
    from gui.widgets.technique_panel import TechniquePanel
    panel = TechniquePanel()
    qtbot.addWidget(panel)
    shown = {}
    for t in all_techniques():
        for name, ed in panel.groups[t.name].editors.items():
            if ed.slider is not None:
                shown[(t.name, name)] = ed.box.text()
    assert shown[("distill", "lr")] == "2.0e-4"  # was "0.00020 learning rate"
    assert shown[("distill", "temperature")] == "1.0" and shown[("distill", "hidden_mse")] == "0.0"
    assert shown[("early_exit", "first_exit")] == "50 %" and shown[("gptq", "damping")] == "0.010"
    # a value box is a number and at most a short unit: it sits in a narrow column beside the slider; a long
    # unit is in the row's label
    assert all(len(text) <= 14 for text in shown.values()), {k: v for k, v in shown.items() if len(v) > 14}
    gptq = panel.groups["gptq"]
    assert gptq.body.layout().labelForField(gptq.editors["damping"]).text() == "damping (× mean diag)"


def test_a_value_between_slider_stops_is_kept_and_a_typed_value_moves_the_slider(qtbot):
    from core.recipe import from_data
    from gui.widgets.technique_panel import TechniquePanel
    panel = TechniquePanel()
    qtbot.addWidget(panel)
    # a recipe written by hand (or by the CLI) with values between the 5 % / 16-token stops opens unchanged
    steps = [{"technique": "sparsegpt", "sparsity": 0.33}, {"technique": "distill", "lr": 1.5e-5, "minutes": 7.25},
             {"technique": "kv_quant", "residual": 17}]
    assert panel.set_recipe(from_data({"steps": steps})) == []
    got = {s["technique"]: s for s in panel.recipe_data()["steps"]}
    assert got["sparsegpt"]["sparsity"] == 0.33 and got["distill"]["lr"] == 1.5e-5
    assert got["distill"]["minutes"] == 7.25 and got["kv_quant"]["residual"] == 17
    sparsity = panel.groups["sparsegpt"].editors["sparsity"]
    assert sparsity.box.text() == "33 %" and sparsity.stops[sparsity.slider.value()] == 0.35  # nearest stop
    # typing a percentage sets the value and moves the slider; an unreadable entry changes nothing
    sparsity.box.lineEdit().setText("42 %")
    sparsity.box.interpretText()
    assert sparsity.value() == 0.42 and sparsity.stops[sparsity.slider.value()] == 0.4
    sparsity.box.lineEdit().setText("lots")
    sparsity.box.interpretText()
    assert sparsity.value() == 0.42
    sparsity.slider.setValue(sparsity.slider.value() + 1)  # the slider snaps back onto its stops
    assert sparsity.value() == 0.45
    # a learning rate over three decades: the default sits mid-track (a linear track put it at 2 %), stops are round
    lr = panel.groups["distill"].editors["lr"]
    lr.set_value(2e-4)
    assert 0.35 < lr.slider.value() / lr.slider.maximum() < 0.5
    assert {1e-5, 1e-4, 2e-4, 5.1e-4, 1e-3, 1e-2} <= set(lr.stops)
    # a seed has no slider (two billion stops cannot be aimed at): its box takes any value
    seed = panel.groups["distill"].editors["seed"]
    assert seed.slider is None
    seed.box.lineEdit().setText("123456789")
    seed.box.interpretText()
    assert seed.value() == 123456789


def test_side_by_side_generates_both_and_colours_the_variant_by_kl(qtbot, open_window):
    w = window_with_run(qtbot, open_window, [{"technique": "rtn", "bits": 2, "group_size": 0}])
    rows = rows_by_label(w)
    variant = next(r for label, r in rows.items() if label.startswith("rtn"))
    cv = w.compare_view
    assert cv.reference.currentData() == rows["baseline"]["id"] and cv.variant.currentData() == variant["id"]
    cv.prompt.setText("The tower is")
    cv.new_tokens.setValue(6)
    qtbot.mouseClick(cv.button, Qt.LeftButton)
    wait_idle(qtbot, w)
    r = cv.result
    assert r is not None and len(r["reference"]["ids"]) == len(r["variant"]["ids"]) == 6
    assert w.views.currentWidget() is cv
    assert "baseline" in cv.ref_out.toPlainText() and "The tower is" in cv.var_out.toPlainText()
    assert "mean KL" in cv.var_out.toPlainText() and r["mean_kl"] > 0
    assert cv.var_out.toHtml().count("background-color") >= 6  # every variant token coloured
    cv.var_out.anchorClicked.emit(QUrl("tok:2"))  # a click on the third token: both models' top-5 there
    assert "reference" in cv.top.text() and "variant" in cv.top.text() and cv.top.text().count("%") >= 10
    assert all(row["kind"] != "compare" or row["status"] == "done" for row in Ledger().rows())


def test_side_by_side_lists_the_unchanged_model_once_and_tells_repeated_recipes_apart(qtbot):
    from gui.widgets.compare_view import CompareView
    cv = CompareView()
    qtbot.addWidget(cv)

    def row(i, label, baseline, key):
        return {"id": f"{i}abcdef0", "label": label, "baseline": baseline, "status": "done", "model": "m",
                "variant_dir": None if baseline else f"/v/{i}", "eval_key": key}

    cv.set_rows([row(1, "baseline", True, "a"), row(2, "rtn bits=4", False, "a"),
                 row(3, "baseline", True, "b"), row(4, "rtn bits=4", False, "b")])  # two eval settings
    names = [cv.reference.itemText(k) for k in range(cv.reference.count())]
    assert names.count("baseline") == 1 and cv.reference.currentData() == "3abcdef0"  # the newest baseline
    assert len(set(names)) == len(names) == 3 and "rtn bits=4 · run 4abcde" in names
    assert cv.variant.currentData() == "4abcdef0"


def test_recommend_selects_the_run_to_ship_and_says_why_and_the_study_exports(qtbot, open_window, tmp_path):
    w = window_with_run(qtbot, open_window, [{"technique": "rtn", "bits": 8, "group_size": 0}])
    rows = rows_by_label(w)
    small = next(r for label, r in rows.items() if label.startswith("rtn"))
    w.target_kind.setCurrentIndex(w.target_kind.findData("size"))
    import math
    w.target_value.setValue(math.ceil(small["size_bytes"] / 1e4 + 1) / 100)  # only the int8 run fits
    qtbot.mouseClick(w.recommend_button, Qt.LeftButton)
    assert w.table.selected_id() == small["id"] and w.recommendation.text().startswith("✔ rtn")
    w.target_value.setValue(0.01)
    qtbot.mouseClick(w.recommend_button, Qt.LeftButton)
    assert w.recommendation.text().startswith("✘ No run has size on disk ≤ 0.01 MB")
    page = w.save_report(str(tmp_path / "study.html"))  # File → Export report…
    assert page and "<svg" in Path(page).read_text() and small["label"] in Path(page).read_text()
    assert w.save_report(str(tmp_path / "study.pdf")) is None and "use .html, .csv or .json" in w.message.text()


def test_an_unhandled_error_shows_a_dialog_with_copyable_details_and_is_logged(qtbot, home):
    from PySide6.QtWidgets import QApplication, QMessageBox

    from gui import crash
    f = crash.setup_logging(faults=False)  # (pytest keeps its own faulthandler)
    try:
        raise RuntimeError("injected for the test")
    except RuntimeError:
        box = crash.show_error(*sys.exc_info())
    assert isinstance(box, QMessageBox) and box.isVisible()
    assert "RuntimeError: injected for the test" in box.text() and "Traceback" in box.detailedText()
    copy = next(b for b in box.buttons() if b.text() == "Copy details")
    copy.click()
    assert "injected for the test" in QApplication.clipboard().text() and box.isVisible()
    assert "injected for the test" in f.read_text()
    box.close()
    for h in [h for h in crash.log.handlers if getattr(h, "baseFilename", "") == str(f)]:
        crash.log.removeHandler(h)
        h.close()


def test_about_lists_versions_and_the_shipped_licenses_and_info_prints_json(qtbot, open_window, home):
    w = open_window()
    d = w.show_about()
    qtbot.waitExposed(d)
    text = d.text.toPlainText()
    assert "Squeeze Studio" in text and "torch" in text and "onnxruntime" in text
    assert "CC BY-SA 3.0" in text and "Apache-2.0" in text and "SmolLM2" in text  # the data's and the model's
    d.close()
    r = _studio("--info", env_home=home)
    info = json.loads(r.stdout)
    assert r.returncode == 0 and info["versions"]["torch"].startswith("2.13")
    assert str(home) in info["folders"]["data (ledger, settings, logs)"] and info["machine"]["cores"] >= 1


def test_theme_override_and_window_settings_persist_across_restarts(qtbot, open_window, tiny_model):
    from PySide6.QtGui import QPalette
    from PySide6.QtWidgets import QApplication
    w = open_window(auto_baseline=False)

    def ink(label):  # the colour its text is drawn in
        return label.palette().color(label.foregroundRole()).lightness()

    w.theme_actions["light"].trigger()
    w.say("Loaded the recipe.")
    w.theme_actions["dark"].trigger()
    qtbot.wait(20)  # the new palette reaches the widgets as events
    assert w.dark and QApplication.instance().palette().color(QPalette.Window).lightness() < 80
    assert ink(w.message) > 150 and ink(w.recipe_label) > 150  # light text on the dark window, not black
    for view in (w.plot.view, w.weight_view.hist, w.sensitivity_view.plot):  # every plot follows the theme
        assert view.backgroundBrush().color().lightness() < 80
    w.resize(1333, 888)
    w.close()
    w2 = open_window(auto_baseline=False)  # a restart: same settings file
    assert w2.theme == "dark" and w2.theme_actions["dark"].isChecked()
    assert w2.store.q.value("geometry") == w.saveGeometry()  # (offscreen clamps sizes to its screen)
    assert w2.model == tiny_model
    w2.say("Loaded the recipe.")
    w2.theme_actions["light"].trigger()
    qtbot.wait(20)
    assert not w2.dark and QApplication.instance().palette().color(QPalette.Window).lightness() > 180
    assert ink(w2.message) < 100 and ink(w2.recipe_label) < 100


def test_dropping_a_model_folder_on_the_window_opens_it(qtbot, open_window, tiny_model, tmp_path):
    from PySide6.QtCore import QMimeData, QPoint
    from PySide6.QtGui import QDropEvent
    w = open_window(model="bundled:smollm2-135m", auto_baseline=False)
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(tiny_model)])
    ev = QDropEvent(QPoint(10, 10), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    w.dropEvent(ev)
    assert w.model == tiny_model and w.model_panel.combo.currentData() == tiny_model
    (tmp_path / "notes.txt").write_text("x")
    mime.setUrls([QUrl.fromLocalFile(str(tmp_path / "notes.txt"))])
    assert w._dropped_model(mime) is None  # not a model: not accepted


def test_a_run_left_running_by_a_gone_app_shows_as_interrupted_and_reruns(qtbot, open_window, tiny_model, tiny_eval):
    from core.jobs.spec import JobSpec
    other = dict(tiny_eval, max_tokens=256)  # measured under other eval settings than the window's now
    spec = JobSpec(tiny_model, recipe={"steps": [{"technique": "rtn", "bits": 8, "group_size": 0}]}, eval=other)
    Ledger().start(spec, pid=2**22 + 12345)  # a worker pid that no longer exists: the app crashed mid-run
    w = open_window()
    wait_baseline(qtbot, w)
    rows = {r["id"]: r for r in Ledger().rows()}
    assert rows[spec.job_id]["status"] == "interrupted"
    w.table.select_id(spec.job_id)
    qtbot.mouseClick(w.rerun_button, Qt.LeftButton)
    wait_idle(qtbot, w)
    again = [r for r in Ledger().rows() if r["label"] == rows[spec.job_id]["label"] and r["status"] == "done"]
    assert len(again) == 1 and again[0]["result"]["ppl"] > 1
    # its own settings' baseline was measured with it, so it is compared with something
    assert Ledger().baseline(tiny_model, spec.eval_key()) is not None
    qtbot.waitUntil(lambda: w.table.selected_id() == again[0]["id"])  # the new run is the one selected
    assert not w.rerun_button.isEnabled()


def test_teaching_mode_explains_the_ticked_technique_and_the_lab_ticks_itself(qtbot, open_window):
    from PySide6.QtWidgets import QApplication
    w = open_window(teach=True)
    assert w.teach_dock.isVisible() and w.teach_action.isChecked()
    wait_baseline(qtbot, w)
    items = {w.teach.checklist.item(k).data(Qt.UserRole): w.teach.checklist.item(k) for k in range(7)}
    assert items["baseline"].checkState() == Qt.Checked and items["int8"].checkState() == Qt.Unchecked
    assert "Next: " in w.teach.hint.text() and "8-bit" in w.teach.hint.text()
    assert w.teach.technique.currentData() == "rtn"  # the next step's technique is explained first
    w.techniques.groups["gptq"].setChecked(True)  # ticking a technique opens its explainer
    assert w.teach.technique.currentData() == "gptq" and w.teach.text.toPlainText().startswith("gptq")
    assert "The one formula" in w.teach.text.toPlainText() and "Typical failure" in w.teach.text.toPlainText()
    w.techniques.groups["gptq"].setChecked(False)
    rtn = w.techniques.groups["rtn"]
    rtn.setChecked(True)
    rtn.editors["bits"].set_value(8)
    w.run()
    wait_idle(qtbot, w)
    assert items["int8"].checkState() == Qt.Checked and "2 of 7 done" in w.teach.hint.text()
    size = QApplication.instance().font().pointSizeF()
    w.teach.fonts.setChecked(True)
    assert QApplication.instance().font().pointSizeF() > 1.3 * size
    assert w.estimate_label.font().pointSizeF() > 1.3 * size  # styled labels grow too (they kept their font)
    w.teach.fonts.setChecked(False)
    w.teach_action.trigger()  # off again, and remembered
    assert not w.teach_dock.isVisible() and w.store.get("teach") is False


def test_weight_view_shows_histograms_codes_and_per_layer_bits(qtbot, open_window, tmp_path):
    w = window_with_run(qtbot, open_window, [{"technique": "rtn", "bits": 3, "group_size": 32}])
    wv = w.weight_view
    assert wv.run.count() == 1  # the baseline has no variant to compare
    qtbot.mouseClick(wv.button, Qt.LeftButton)
    wait_idle(qtbot, w)
    assert w.views.currentWidget() is wv and wv.layer.count() == 14
    wv.layer.setCurrentIndex(3)
    lay = wv.result["layers"][3]
    assert len(lay["codes"]) == 8 and "bits/weight" in wv.note.text() and lay["name"] in wv.note.text()
    # the plots draw this layer: its before/after histograms and one bar per integer code
    assert list(wv.before.yData) == lay["before"] and list(wv.after.yData) == lay["after"]
    assert list(wv.code_bars.opts["height"]) == lay["codes"] and sum(lay["codes"]) > 0
    # per Linear: bits on the left scale (3 bits fill it), zeros % on a 0-100 scale of their own
    assert wv.per_layer.getPlotItem().vb.viewRange()[1][1] < 5 and wv.zeros_box.viewRange()[1] == [0, 100]
    # each refresh re-reads only the table's rows (a weight view's result is ~0.6 MB on SmolLM2: ~30 ms to parse
    # on the GUI thread); the exported ledger still has every job
    assert {r["kind"] for r in w.runs} == {"eval"}
    ledger = json.loads(Path(w.save_report(str(tmp_path / "ledger.json"))).read_text())
    assert [r["kind"] for r in ledger].count("weights") == 1


def test_preflight_shows_an_estimate_and_refuses_an_absurd_ram_need(qtbot, open_window, monkeypatch):
    from core import preflight
    w = open_window(auto_baseline=False)
    qtbot.waitUntil(lambda: w.model_panel.info is not None, timeout=10_000)
    w.techniques.groups["rtn"].setChecked(True)
    assert w.estimate_label.text().startswith("estimate: ≈ ") and "GB RAM" in w.estimate_label.text()
    monkeypatch.setattr(preflight, "free_ram", lambda: 10_000_000)  # 10 MB free
    w.run()
    assert not w.client.running and "Not started: this job needs about" in w.message.text()
    assert not [r for r in Ledger().rows() if r["label"].startswith("rtn")]  # nothing ran, nothing recorded


def test_closing_with_a_job_running_can_stay_or_let_it_finish_in_the_background(qtbot, open_window, tiny_eval):
    w = open_window(eval_settings=dict(tiny_eval, new_tokens=32, repeats=40))  # a baseline of some seconds
    qtbot.waitUntil(lambda: w.client.running and w.stage_label.text().startswith(("load", "evaluate")),
                    timeout=JOB_MS)
    job_id = w.current.job_id
    w.ask_on_close = lambda: "stay"
    w.close()
    assert w.isVisible() and w.client.running  # "Don't quit"
    w.ask_on_close = lambda: "background"
    w.close()
    assert not w.isVisible()
    qtbot.waitUntil(lambda: Ledger().get(job_id)["status"] != "running", timeout=JOB_MS)
    row = Ledger().get(job_id)
    assert row["status"] == "done" and row["result"]["ppl"] > 1  # finished and recorded by the worker itself
    qtbot.waitUntil(lambda: not w.client.running, timeout=JOB_MS)  # and the worker process has ended
    assert w.client.job.proc.poll() == 0


def test_self_test_opens_the_window_runs_one_job_through_the_worker_and_exits_0(home, tiny_model):
    r = _studio("--self-test", "--model", tiny_model, env_home=home)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["self_test"] == "ok" and out["ppl"] > 1 and out["size_bytes"] > 0
    assert out["window"] == "offscreen 1280x800"
    # a check of the install, not a run: a lecturer who self-tests each lab PC hands out a clean table and lab
    assert Ledger(home / "data" / "ledger.sqlite").rows() == []
    assert not any((home / "workspace" / "variants").glob("*/squeeze.json"))


def test_clicking_a_sensitivity_cell_keeps_that_linear_out_of_the_recipe(qtbot, open_window):
    w = open_window()
    wait_baseline(qtbot, w)
    sv = w.sensitivity_view
    sv.technique.setCurrentIndex(sv.technique.findData("rtn"))
    sv.setting.setValue(3)
    sv.tokens.setValue(256)
    qtbot.mouseClick(sv.button, Qt.LeftButton)
    wait_idle(qtbot, w)
    assert w.views.currentWidget() is sv and sv.result["layers"] == 2 and "Most sensitive" in sv.hint.text()
    qtbot.wait(100)
    vb = sv.plot.getPlotItem().vb
    (x0, x1), (y0, y1) = vb.viewRange()  # the whole map is in view: every module column, every layer
    assert x0 <= 0 and x1 >= len(sv.result["modules"]) and y0 <= 0 and y1 >= 2
    pos = sv.plot.mapFromScene(vb.mapViewToScene(QPointF(6.5, 1.5)))  # layer 1, down_proj
    qtbot.mouseClick(sv.plot.viewport(), Qt.LeftButton, pos=pos)
    rtn = w.techniques.groups["rtn"]
    assert rtn.isChecked() and rtn.editors["bits"].value() == 3
    assert rtn.editors["exclude"].value() == "layers.1.mlp.down_proj"
    assert "layers.1.mlp.down_proj" in w.recipe_label.text()


def test_mixed_precision_from_the_sensitivity_map_proposes_for_a_budget_and_runs_it(qtbot, open_window):
    w = open_window()
    wait_baseline(qtbot, w)
    sv = w.sensitivity_view
    assert not sv.mixed_button.isEnabled()  # nothing scanned yet
    sv.technique.setCurrentIndex(sv.technique.findData("rtn"))
    sv.setting.setValue(2)
    sv.tokens.setValue(256)
    qtbot.mouseClick(sv.button, Qt.LeftButton)
    wait_idle(qtbot, w)
    assert sv.mixed_button.isEnabled()
    sv.budget_slider.setValue(0)  # the smallest budget: every Linear at 2 bits
    assert sv.allocation["upgrade"] == [] and "0 of 14 Linears at 8 bits" in sv.proposal.text()
    sv.budget_slider.setValue(500)
    n = len(sv.allocation["upgrade"])
    assert 0 < n < 14 and f"{n} of 14 Linears at 8 bits" in sv.proposal.text()
    qtbot.mouseClick(sv.mixed_button, Qt.LeftButton)
    rtn = w.techniques.groups["rtn"]
    assert rtn.isChecked() and rtn.editors["bits"].value() == 2
    assert rtn.editors["upgrade_8bit"].value() == ", ".join(sv.allocation["upgrade"])
    wait_idle(qtbot, w)
    runs = [r for r in w.table.results.rows if not r["baseline"]]
    assert runs and runs[-1]["status"] == "done" and "rtn bits=2" in runs[-1]["label"]


@pytest.mark.quiet_machine
def test_the_event_loop_never_stalls_over_50_ms_while_any_job_runs(qtbot, open_window):
    from stall import StallMeter, drive_every_job, worst_twice
    w = open_window()
    meter = StallMeter()  # started by drive_every_job once the window's opening work is done
    try:
        # a job over the bar is run once more: a neighbour's burst on a shared CI host stalls one run,
        # a slow slot of ours stalls both
        measured = drive_every_job(w, lambda acted: qtbot.waitUntil(
            lambda: acted() and w.settled, timeout=JOB_MS),
            lambda: wait_baseline(qtbot, w), meter, again_over=50)
    finally:
        meter.stop()
    worst = worst_twice(measured)
    kinds = {"eval (baseline)", "eval (run)", "sensitivity", "compare", "weights", "export"}
    assert kinds <= set(worst), worst
    assert all(r["status"] == "done" for r in w.table.results.rows), [r["status"] for r in w.table.results.rows]
    print("worst event-loop gap per job (ms):", {k: round(v, 1) for k, v in measured.items()})
    assert max(worst.values()) <= 50, f"worst event-loop gap per job (ms): {measured}"


def test_double_clicking_a_run_loads_its_recipe_to_tweak(qtbot, open_window, tiny_model, tiny_eval):
    from core.jobs.client import run_inline
    from core.jobs.spec import JobSpec
    steps = [{"technique": "magnitude_prune", "sparsity": 0.3}, {"technique": "rtn", "bits": 8}]
    assert run_inline(JobSpec(model=tiny_model, recipe={"steps": steps}, eval=tiny_eval)).outcome == "done"
    w = open_window(auto_baseline=False)
    qtbot.waitUntil(lambda: any(not r["baseline"] for r in w.table.results.rows))
    i = next(i for i, r in enumerate(w.table.results.rows) if not r["baseline"])
    rect = w.table.visualRect(w.table.results.index(i, 1))
    qtbot.mouseClick(w.table.viewport(), Qt.LeftButton, pos=rect.center())  # a double click starts with a press
    qtbot.mouseDClick(w.table.viewport(), Qt.LeftButton, pos=rect.center())
    assert [s["technique"] for s in w.recipe().to_dict()["steps"]] == ["magnitude_prune", "rtn"]
    assert w.techniques.groups["magnitude_prune"].editors["sparsity"].value() == pytest.approx(0.3)
    assert w.techniques.groups["rtn"].body.isVisible() and "Loaded the recipe" in w.message.text()


def test_the_window_fits_a_1024_pixel_screen_and_teaching_mode_a_1280_one(qtbot, open_window):
    from PySide6.QtWidgets import QScrollArea
    w = open_window(auto_baseline=False)
    assert w.minimumSizeHint().width() <= 1024
    w.set_teaching(True)
    w.teach.fonts.setChecked(True)  # the projector set-up: dock and larger fonts
    qtbot.wait(50)
    assert w.minimumSizeHint().width() <= 1280
    size = w.size()
    w.resize(1280, 720)  # a lecture-hall projector: nothing needs a sideways scroll to be read
    qtbot.wait(50)
    for scroll in (w.left_scroll, w.export_panel.findChild(QScrollArea)):
        assert scroll.widget().minimumSizeHint().width() <= scroll.viewport().width()
    for view in (w.sensitivity_view, w.weight_view):  # their plots scroll up and down, never sideways
        w.views.setCurrentWidget(view)
        qtbot.wait(20)
        scroll = view.findChild(QScrollArea)
        assert scroll.widget().minimumSizeHint().width() <= scroll.viewport().width(), type(view).__name__
    w.resize(size)
    w.teach.fonts.setChecked(False)
    w.set_teaching(False)


def test_the_delete_key_removes_a_run_and_its_saved_variant_after_asking(qtbot, open_window):
    w = window_with_run(qtbot, open_window, [{"technique": "rtn", "bits": 4}])
    run = next(r for r in w.table.results.rows if r["label"].startswith("rtn"))
    variant = Path(run["variant_dir"])
    asked = []
    w.confirm_forget = lambda row, exports: asked.append(row["id"]) or False  # "No": nothing happens
    w.table.select_id(run["id"])
    w.table.setFocus()
    qtbot.keyClick(w.table, Qt.Key_Delete)
    assert asked == [run["id"]] and variant.is_dir() and w.table.results.row_of(run["id"]) >= 0
    w.confirm_forget = lambda row, exports: True
    qtbot.keyClick(w.table, Qt.Key_Delete)
    assert w.table.results.row_of(run["id"]) < 0 and not variant.exists()
    qtbot.waitUntil(lambda: w.settled)  # the plot follows the table a slice later
    assert run["id"] not in {p["id"] for p in w.plot.points} and "Deleted" in w.message.text()


def test_a_rows_tooltip_says_when_a_budget_ran_fewer_distill_steps_than_asked(qtbot):
    from core.results import table_rows
    from gui.widgets.results_table import ResultsModel
    info = [{"technique": "distill", "seconds": 840.0, "steps": 220, "steps_asked": 1000, "minutes": 14.0}]
    runs = [{"id": "d", "kind": "eval", "model": "m", "label": "distill steps=1000 minutes=14.0", "eval_key": "k",
             "status": "done", "recipe": {"steps": [{"technique": "distill"}]}, "created": 1,
             "result": {"ppl": 30.0, "steps": info}}]
    m = ResultsModel()
    m.set_rows(table_rows(runs), "k")
    tip = m.data(m.index(0, 0), Qt.ItemDataRole.ToolTipRole)
    assert tip.splitlines() == ["distill steps=1000 minutes=14.0",
                                "distill ran 220 of its 1000 steps: its 14-minute budget held no more"]
