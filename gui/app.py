"""`squeeze-studio`: the desktop app. `--screenshot FILE.png` renders the main window and exits
(for tests and docs)."""
from __future__ import annotations

import argparse
import os
import sys
import time

from core.errors import SqueezeError

APP_NAME = "Squeeze Studio"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v
    try:
        return v("squeeze-studio")
    except PackageNotFoundError:
        return "0+unknown"


def icon():
    from PySide6.QtGui import QIcon

    from core import paths
    return QIcon(str(paths.resources_dir() / "icons" / "squeeze-studio.svg"))


def parse(argv):
    p = argparse.ArgumentParser(prog="squeeze-studio", description="Compress language models with sliders, "
                                "measure the trade-offs, export to ONNX.")
    p.add_argument("--model", metavar="ID", help="model to open: bundled:smollm2-135m (default: the last "
                   "one used, else the bundled model), a model folder, a .gguf file or a cached hub id")
    p.add_argument("--screenshot", metavar="FILE.png", help="render the main window to FILE.png and exit "
                   "(default model: the bundled one; starts no job)")
    p.add_argument("--version", action="version", version=f"squeeze-studio {version()}")
    p.add_argument("--self-test", action="store_true", help="load the bundled model, run one small rtn job "
                   "through the worker process, print what it measured and exit (0 = the install works)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the installed app's worker mode
    p.add_argument("--teach", action="store_true", help="open in teaching mode (explainers and the guided lab)")
    p.add_argument("--info", action="store_true", help="print versions, folders, machine and model cache as JSON "
                   "and exit")
    return p.parse_args(argv)


def no_display(render_only: bool) -> str | None:
    """On Linux without a screen (no DISPLAY / WAYLAND_DISPLAY, no QT_QPA_PLATFORM) Qt aborts with a core dump.
    Rendering to a file (--screenshot, --self-test) needs no screen: it uses the offscreen platform. The
    window itself does: -> the line saying so, or None."""
    import os
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM") \
            or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    if render_only:
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        return None
    return ("no screen to open the window on (DISPLAY is not set). Run it in a desktop session, or on a "
            "virtual screen (xvfb-run ./studio); without one, the CLI does everything: .venv/bin/squeeze --help")


def check_png(out: str):
    from pathlib import Path
    out_path = Path(out).expanduser()
    if out_path.suffix.lower() != ".png":
        raise ValueError(f"the screenshot must be a .png file, got {out_path.name}")
    if not out_path.parent.is_dir():
        raise ValueError(f"cannot write {out_path}: the folder {out_path.parent} does not exist")
    return out_path


def quiet_qt() -> None:
    """Keeps stderr to what matters: the offscreen platform warns about window hints it ignores."""
    from PySide6.QtCore import qInstallMessageHandler

    def handler(mode, context, message):
        if "propagateSizeHints" not in message:
            sys.stderr.write(message + "\n")

    qInstallMessageHandler(handler)


def wait_for_model(window, app) -> None:
    """Waits (briefly) for the model facts, read on a thread; raises when the model cannot be read."""
    deadline = time.monotonic() + 10
    while window.model_panel.info is None and not window.model_panel.note.isVisible() \
            and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.02)
    if window.model_panel.info is None:  # the model could not be read: say why, write nothing
        raise ValueError(window.model_panel.note.text() or f"cannot read the model {window.model}")
    for _ in range(5):
        app.processEvents()


def screenshot(window, app, out_path) -> None:
    wait_for_model(window, app)
    if not window.grab().save(str(out_path), "PNG"):
        raise ValueError(f"cannot write {out_path}")


def window_check(model: str) -> str:
    """Opens the main window on `model` on whatever screen Qt finds (a display, Xvfb, offscreen),
    renders it and closes it: the install's Qt plugins and the model facts work."""
    from PySide6.QtWidgets import QApplication

    from .main_window import MainWindow
    quiet_qt()
    app = QApplication.instance() or QApplication([sys.argv[0]])
    window = MainWindow(model=model, auto_baseline=False)
    window.resize(1280, 800)
    window.show()
    wait_for_model(window, app)
    image = window.grab().toImage()
    window.close()
    # a window that drew nothing is one colour: sample a row of pixels across it
    colours = {image.pixel(x, image.height() // 3) for x in range(0, image.width(), 7)}
    if image.isNull() or len(colours) < 3:
        raise ValueError(f"the main window rendered blank on the {app.platformName()} platform")
    return f"{app.platformName()} {image.width()}x{image.height()}"


def self_test(model: str | None = None) -> int:
    """The main window opens and renders, then one tiny job runs end to end through a real worker
    process: model load (and, on a first run, conversion), a recipe, save, load back, perplexity,
    decode speed, the ledger row — then the row and its variant are deleted again."""
    import json
    import tempfile

    from core.jobs.client import WorkerJob
    from core.jobs.spec import JobSpec
    from core.ledger import Ledger
    from core.models import DEFAULT_MODEL

    t0 = time.monotonic()
    try:
        window = window_check(model or DEFAULT_MODEL)
    except (SqueezeError, ValueError, OSError) as e:
        print(f"self-test FAILED: the main window: {e}", file=sys.stderr)
        return 1
    text = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8")
    from core import paths
    text.write(paths.default_eval_text().read_text(encoding="utf-8")[:4000])
    text.close()
    spec = JobSpec(model or DEFAULT_MODEL, recipe={"steps": [{"technique": "rtn", "bits": 8, "group_size": 0}]},
                   eval={"text": text.name, "max_tokens": 256, "context": 128, "prompt_tokens": 8, "new_tokens": 4,
                         "repeats": 1})
    events = []
    ledger = Ledger()
    job = WorkerJob(spec, events.append, ledger).start()
    job.wait(900)
    try:  # a check, not a run: no row in the user's table or the lab's checklist, no 200 MB variant left behind
        ledger.forget(spec.job_id)
    except SqueezeError:
        pass
    os.unlink(text.name)
    res = next((e for e in events if e["type"] == "result"), None)
    err = next((e for e in events if e["type"] == "error"), None)
    if res is None:
        print(f"self-test FAILED: {err['message'] if err else 'the worker gave no result'}", file=sys.stderr)
        for e in [e for e in events if e["type"] == "log"][-20:]:  # what the worker said last
            print("  " + e["text"].rstrip(), file=sys.stderr)
        return 1
    p = res["payload"]
    print(json.dumps({"self_test": "ok", "model": spec.model, "window": window, "ppl": p["ppl"], "size_bytes": p["size_bytes"],
                      "decode_tokens_per_s": p["decode_tokens_per_s"], "seconds": round(time.monotonic() - t0, 1)}))
    return 0


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.worker:
        from core.jobs.worker import main as worker_main
        return worker_main()
    headless = no_display(render_only=bool(args.self_test or args.screenshot))
    if headless and not args.info:
        print(f"squeeze-studio: {headless}", file=sys.stderr)
        return 1
    if args.self_test:
        return self_test(args.model)
    if args.info:
        import json

        from core import about
        try:
            print(json.dumps(about.info(), indent=2), flush=True)
        except BrokenPipeError:  # `squeeze-studio --info | head`: the reader left; no traceback for that
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    try:
        shot = check_png(args.screenshot) if args.screenshot else None
        from PySide6.QtWidgets import QApplication, QMessageBox

        from core.models import DEFAULT_MODEL

        from .main_window import MainWindow
        quiet_qt()
        app = QApplication.instance() or QApplication([sys.argv[0]])
        app.setApplicationName(APP_NAME)
        app.setOrganizationName("squeeze-studio")
        app.setApplicationVersion(version())
        app.setWindowIcon(icon())
        if shot:
            window = MainWindow(model=args.model or DEFAULT_MODEL, auto_baseline=False,
                                teach=True if args.teach else None)
            window.resize(1440, 900)
            window.show()
            screenshot(window, app, shot)
            window.close()
            return 0
        from . import crash
        crash.install()  # log file, faulthandler, error dialog instead of a silent exit
        crash.log.info("squeeze-studio %s starting", version())
        window = MainWindow(model=args.model, teach=True if args.teach else None)
        window.show()
        return app.exec()
    except (SqueezeError, ValueError, OSError) as e:
        print(f"squeeze-studio: {e}", file=sys.stderr)
        if not args.screenshot and "QApplication" in locals() and QApplication.instance() is not None:
            # started from an icon, there is no terminal to read the line above
            QMessageBox.critical(None, APP_NAME, f"Squeeze Studio cannot start:\n\n{e}")
        return 2  # bad input (a model, a file name), as the CLI says it


if __name__ == "__main__":
    sys.exit(main())
