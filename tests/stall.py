"""Event-loop stall meter for the GUI thread, and one driver that runs every job kind through a
window as a user would (used by tests/test_gui.py on the tiny model and bench/gui_stall.py on the
bundled one). A 5 ms QTimer ticks on the GUI thread; a tick that comes late shows how long the
loop was blocked (queued events, a slow slot, a repaint)."""
from __future__ import annotations

import time

from PySide6.QtCore import QObject, QTimer

TICK_MS = 5


class StallMeter(QObject):
    def __init__(self):
        super().__init__()
        self.timer = QTimer(self)
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self.label = "idle"
        self.worst: dict[str, float] = {}  # label -> worst gap between ticks (ms)
        self.last = None

    def start(self):
        self.last = time.perf_counter()
        self.timer.start()
        return self

    def stop(self):
        self.timer.stop()

    def _tick(self):
        now = time.perf_counter()
        gap = (now - self.last) * 1000
        self.last = now
        self.worst[self.label] = max(self.worst.get(self.label, 0.0), gap)


def drive_every_job(w, wait_idle, wait_baseline, meter: StallMeter,
                    steps=({"technique": "rtn", "bits": 4, "group_size": 64},), tokens: int = 256,
                    export: str | None = None, again_over: float | None = None) -> dict:
    """A freshly opened window (its baseline queued on open): baseline, a run, sensitivity scan,
    side-by-side, weight view, export (`export`: None = fp32, int8, int4); the meter's label says
    which job is running. Each action is posted to the event loop as a click would be, in its own
    slice. The meter starts here, once the window's opening work is done. `again_over`: an action
    whose worst gap was over that many ms is done once more, under "<label> (again)" — on a shared
    machine a neighbour's burst can stall one job; a stall of ours shows both times. -> the meter's
    worst gaps per job (ms)."""
    from PySide6.QtCore import QEventLoop, QTimer

    from core.recipe import from_data

    def act(label, fn):
        # a user's click comes a moment after the last job's end has been drawn, not in the same slice
        settled = []
        QTimer.singleShot(300, lambda: settled.append(1))
        wait_idle(lambda: bool(settled))
        done = []
        QTimer.singleShot(0, lambda: (setattr(meter, "label", label), fn(), done.append(1)))
        wait_idle(lambda: bool(done))

    # building the window is not "while a job runs": its deferred part (polishing ~700 widgets, the first
    # full paint: ~130 ms on a slow CPU) is over before the meter starts, while the baseline's worker is
    # still starting (importing torch takes seconds), so the whole baseline job is measured
    loop = QEventLoop()  # (not wait_idle: that waits for the baseline's end too)
    QTimer.singleShot(400, loop.quit)
    loop.exec()
    assert not any(r["baseline"] and r["status"] == "done" for r in w.table.results.rows), \
        "the baseline finished before the meter started: its job would not be measured"
    meter.label = "eval (baseline)"
    meter.start()
    wait_baseline()
    acts = {"recipe": lambda: w.techniques.set_recipe(from_data({"steps": list(steps)})),  # a click, then another
            "eval (run)": w.run}
    for label, fn in acts.items():
        act(label, fn)
    rows = w.table.results.rows
    base = next(r for r in rows if r["baseline"] and r["status"] == "done")
    run = next(r for r in rows if not r["baseline"] and r["status"] == "done")
    later = {"sensitivity": lambda: w.scan_sensitivity("rtn", 4, tokens),
             "compare": lambda: w.compare(base["id"], run["id"], "The history of the city", 16),
             "weights": lambda: w.view_weights(run["id"]),
             "select a row": lambda: w.table.select_id(run["id"]),
             "export": lambda: w.export_selected(None, export, None)}
    for label, fn in later.items():
        act(label, fn)
    acts.update(later)
    if again_over is not None:
        for label, fn in acts.items():
            if meter.worst.get(label, 0) > again_over:
                act(f"{label} (again)", fn)
    meter.label = "idle"
    return dict(meter.worst)


def worst_twice(worst: dict) -> dict:
    """Per job, the lesser of its worst gap and its repeat's (drive_every_job's `again_over`)."""
    return {k: min(v, worst.get(f"{k} (again)", v)) for k, v in worst.items() if not k.endswith(" (again)")}
