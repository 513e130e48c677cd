"""GUI responsiveness on the bundled model: the window driven through every job kind (baseline,
an rtn 4-bit run, sensitivity scan, side by side, weight view, ONNX export) while a 5 ms timer on
the GUI thread records the longest gap between its ticks (tests/stall.py, as in the test suite);
and start to a rendered window from the .venv.

    .venv/bin/python bench/gui_stall.py [--tokens 1024]

Bars (issue 7): no event-loop stall > 50 ms while a job runs; window visible ≤ 2 s after launch.
Rewrites the "gui-stall" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, ROOT, isolated_home  # noqa: E402
from results_md import write_section  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
_HOME = isolated_home("squeeze-stall-")
os.environ["SQUEEZE_HOME"] = str(_HOME)
atexit.register(shutil.rmtree, _HOME, True)  # its exports and variants (~0.7 GB) serve no later bench


def window_seconds(repeats: int = 3) -> list[float]:
    # a warm start, as every launch after the first: the project's byte code current (./studio compiles it at
    # set-up; an edit since then would otherwise be compiled on each start here, PYTHONDONTWRITEBYTECODE or not)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "core", "gui"], cwd=ROOT, check=True,
                   capture_output=True)
    out = []
    for _ in range(repeats):
        shot = _HOME / "w.png"
        t0 = time.perf_counter()
        r = subprocess.run([str(ROOT / ".venv" / "bin" / "squeeze-studio"), "--screenshot", str(shot)],
                           capture_output=True, text=True, timeout=120)
        out.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(r.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="sensitivity scan tokens")
    a = ap.parse_args()
    from PySide6.QtWidgets import QApplication
    from stall import StallMeter, drive_every_job

    from gui.main_window import MainWindow
    app = QApplication.instance() or QApplication([])

    def wait_until(pred, timeout=3600):
        end = time.monotonic() + timeout
        while not pred():
            app.processEvents()
            time.sleep(0.002)
            if time.monotonic() > end:
                raise SystemExit("timed out")

    w = MainWindow(model=MODEL)
    w.ask_on_close = lambda: "cancel"
    w.resize(1440, 900)
    w.show()
    t0 = time.monotonic()
    meter = StallMeter()  # started by drive_every_job once the window's opening work is done
    worst = drive_every_job(
        w, lambda acted: wait_until(lambda: acted() and w.settled),
        lambda: wait_until(lambda: any(r["baseline"] and r["status"] == "done" for r in w.table.results.rows)
                           and w.settled),
        meter, tokens=a.tokens)
    meter.stop()
    minutes = (time.monotonic() - t0) / 60
    statuses = [r["status"] for r in w.table.results.rows]
    w.close()
    starts = window_seconds()
    rows = "\n".join(f"| {k} | {v:.0f} ms |" for k, v in worst.items() if k != "idle")
    body = f"""## GUI responsiveness (issue 7)

Command: `.venv/bin/python bench/gui_stall.py --tokens {a.tokens}` — the main window (offscreen, 1440×900) on the
bundled model, driven through every job kind as a user would (each action posted to the event loop like a click),
{minutes:.1f} min in all; a 5 ms QTimer on the GUI thread records the longest gap between its ticks while each
job runs (`tests/stall.py`; the same measure is asserted ≤ 50 ms on the tiny model by
`tests/test_gui.py::test_the_event_loop_never_stalls_over_50_ms_while_any_job_runs`). Rows: {', '.join(statuses)}.

| while this runs | worst event-loop gap (bar 50 ms) |
|---|---|
{rows}

**Worst: {max(v for k, v in worst.items() if k != 'idle'):.0f} ms.** What it took: jobs start from a helper thread (process spawn + ledger row),
a job's result and its end are handled in separate slices of the event loop, the results table measures its
columns itself (Qt's resizeColumnsToContents asked the model for every role of every cell: 10–15 ms), the
model's roles are plain ints (PySide6's enum lookups were 12 % of the busy time), the trade-off plot's grid is
drawn on major ticks and cached (all plots), the weight view keeps its plot items and sets its ranges (adding
and removing items and pyqtgraph's auto-range painted each plot twice), a finished view is switched to in a slice
of its own, the window's startup objects are frozen out of the garbage collector's reach (a full collection walked
~70,000 of them: ~50 ms on a slow CPU), deferred slices are ≥ 1 ms timers (a 0 ms single shot is a posted
event, run in one batch with the pending repaint), the window re-reads only the table's rows from the ledger (a
weight view's result is ~0.6 MB: 31 ms to parse on each refresh), a refresh whose table rows did not change
redraws nothing (after a sensitivity scan the hidden trade-off plot's redraw sent the repaint that carried the newly
filled map's first paint: 94 ms → 25 ms on the AMD EPYC), the plots' axes reserve their tick-label room from the
font once (new data with wider or narrower labels resized the axes, re-laid out the plot and painted it again),
the worker's events reach the GUI thread as Python objects (a `Signal(dict)` copied each event into a QVariantMap
and back: ~30 ms for a weight view's result), that result carries each Linear's histogram bins as one limit
instead of 82 edges (0.62 → 0.27 MB, parsed in one GIL-holding call while the GUI thread waits), and the worker
runs at a lower CPU priority than the window. The meter
starts once the window's own opening work (polish, first full paint) is done, before the baseline's worker is up.

Start to a rendered main window from the .venv (`squeeze-studio --screenshot`, bar 2 s): median
**{statistics.median(starts):.2f} s** (max {max(starts):.2f} s, {len(starts)} starts, warm: the project's byte code compiled, as
`./studio` leaves it); the built bundle: section "bundle". What it took: the ledger's check for runs left running
reads only those rows (it parsed every row's result), a technique's sliders are built when it is first ticked,
and `./studio` byte-compiles the project (2.13–2.25 s → 1.44 s on this AMD EPYC).
"""
    write_section("gui-stall", body)
    print(body)


if __name__ == "__main__":
    main()
