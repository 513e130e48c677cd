"""Renders the screenshots in docs/screenshots that need a job to have run (offscreen, on a tiny
random Llama so it takes seconds):

    QT_QPA_PLATFORM=offscreen .venv/bin/python docs/screens.py export

export: an rtn 4-bit run exported to CPU int4, its verified numbers and its row in the table.
compare: side-by-side generation of the baseline and an rtn 3-bit variant, tokens coloured by KL.
weights: weight histogram before/after, integer codes used, bits and sparsity per layer (rtn 4-bit).
sensitivity: the sensitivity heat map (rtn 3-bit, one Linear at a time) after a click kept one Linear out,
  and the mixed-precision proposal for a size budget.
teach: teaching mode, the gptq explainer and the lab checklist part done.
preflight: a job refused because it needs more RAM than is free.
themes: the main window in light and dark mode (a tiny run and its int8 export in the table).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ["SQUEEZE_HOME"] = tempfile.mkdtemp(prefix="squeeze-screens-")
OUT = ROOT / "docs" / "screenshots"


def _tiny_model(tmp: Path) -> str:
    """The tests' tiny Llama, wider so weights dominate as in real models."""
    import conftest

    class Factory:  # the bits of pytest's tmp_path_factory the fixture uses
        def mktemp(self, name):
            p = tmp / name
            p.mkdir()
            return p
    tok = conftest.tiny_tokenizer_dir.__wrapped__(Factory())
    return str(conftest.make_tiny_llama(tmp / "llama", tok, hidden_size=256, intermediate_size=704,
                                        num_attention_heads=4, num_key_value_heads=2))


def wait(app, cond, timeout=300):
    import time
    t0 = time.time()
    while not cond():
        app.processEvents()
        time.sleep(0.02)
        if time.time() - t0 > timeout:
            raise TimeoutError
    app.processEvents()


def window_with_run(steps: list):
    """A shown window on the tiny model with its baseline and one run of `steps` done."""
    from PySide6.QtWidgets import QApplication

    from core.recipe import from_data
    from gui.main_window import MainWindow

    app = QApplication.instance() or QApplication([])
    text = ROOT / "resources" / "data" / "eval.txt"
    model = _tiny_model(Path(tempfile.mkdtemp()))
    w = MainWindow(model=model, eval_settings=dict(text=str(text), max_tokens=1024, context=128, prompt_tokens=16,
                                                   new_tokens=16, repeats=1))
    w.resize(1500, 950)
    w.show()
    idle = lambda: w.settled  # noqa: E731
    wait(app, lambda: any(r["baseline"] and r["status"] == "done" for r in w.table.results.rows) and idle())
    w.techniques.set_recipe(from_data({"steps": steps}))
    w.run()
    wait(app, lambda: idle() and any(not r["baseline"] and r["status"] == "done" for r in w.table.results.rows))
    return app, w, idle, next(r for r in w.table.results.rows if not r["baseline"])


def save(app, w, name: str) -> Path:
    """Lets the window settle, then writes docs/screenshots/NAME."""
    for _ in range(5):
        app.processEvents()
    OUT.mkdir(parents=True, exist_ok=True)
    f = OUT / name
    w.grab().save(str(f))
    return f


def export_screen() -> Path:
    app, w, idle, rtn = window_with_run([{"technique": "rtn", "bits": 4, "group_size": 64}])
    w.table.select_id(rtn["id"])
    w.export_panel.quantize.setCurrentIndex(w.export_panel.quantize.findData("int4"))
    w.export_selected(None, "int4")
    wait(app, idle)
    w.table.select_id(rtn["id"])
    return save(app, w, "export-int4.png")


def compare_screen() -> Path:
    app, w, idle, run = window_with_run([{"technique": "rtn", "bits": 3, "group_size": 0}])
    cv = w.compare_view
    cv.prompt.setText("The history of the tower")
    cv.new_tokens.setValue(40)
    cv._clicked()
    wait(app, idle)
    return save(app, w, "side-by-side.png")


def themes_screen() -> Path:
    app, w, idle, run = window_with_run([{"technique": "rtn", "bits": 4, "group_size": 64}])
    w.table.select_id(run["id"])
    w.export_selected(None, "int8")
    wait(app, idle)
    w.table.select_id(run["id"])
    for mode in ("light", "dark"):
        w.set_theme(mode)
        f = save(app, w, f"main-{mode}.png")
    return f


def weights_screen() -> Path:
    app, w, idle, run = window_with_run([{"technique": "magnitude_prune", "sparsity": 0.3},
                                         {"technique": "rtn", "bits": 4, "group_size": 64}])
    w.view_weights(run["id"])
    wait(app, idle)
    w.weight_view.layer.setCurrentIndex(5)
    return save(app, w, "weight-view.png")


def sensitivity_screen() -> Path:
    app, w, idle, run = window_with_run([{"technique": "rtn", "bits": 8, "group_size": 0}])
    sv = w.sensitivity_view
    sv.setting.setValue(3)
    sv.tokens.setValue(1024)
    w.scan_sensitivity("rtn", 3, 1024)
    wait(app, idle)
    w.views.setCurrentWidget(sv)
    r = sv.result
    worst = max(((i, m) for i in range(r["layers"]) for m in r["modules"]), key=lambda c: sv.value(*c))
    from core.sensitivity import module_path
    w.exclude_module("rtn", 3, module_path(*worst))
    sv.budget_slider.setValue(300)
    return save(app, w, "sensitivity-map.png")


def teach_screen() -> Path:
    app, w, idle, run = window_with_run([{"technique": "rtn", "bits": 8, "group_size": 0}])
    w.set_teaching(True)
    w.techniques.groups["rtn"].setChecked(False)
    w.techniques.groups["gptq"].setChecked(True)
    return save(app, w, "teaching-mode.png")


def preflight_screen() -> Path:
    from core import preflight
    app, w, idle, run = window_with_run([{"technique": "rtn", "bits": 8, "group_size": 0}])
    preflight.free_ram = lambda: 20_000_000  # as if 20 MB were free
    w.techniques.groups["rtn"].setChecked(False)
    w.techniques.groups["distill"].setChecked(True)
    w.run()
    return save(app, w, "preflight-refusal.png")


SCREENS = {"export": export_screen, "compare": compare_screen, "weights": weights_screen, "themes": themes_screen,
           "sensitivity": sensitivity_screen, "teach": teach_screen, "preflight": preflight_screen}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(SCREENS):
        print(SCREENS[name]())
