"""The worker process: `python -m core.jobs.worker`. Reads one JobSpec (a JSON line) on stdin,
writes the contract's events as JSON lines on stdout; a later line "cancel" on stdin (or stdin
closing: the parent is gone) cancels between steps. A line "detach" (the app closes and the user
keeps the job running) makes the worker record its own outcome in the ledger and finish even
when its parent is gone. Anything else printed goes to stderr."""
from __future__ import annotations

import json
import os
import sys
import threading


def lower_priority() -> None:
    """Jobs yield the CPU to the app's window: on 2 cores, torch's threads would otherwise delay the
    GUI thread's next event by tens of ms. A job alone on the machine runs as fast as before."""
    try:
        if hasattr(os, "nice"):
            os.nice(10)
        else:  # Windows
            import psutil
            psutil.Process().nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)
    except (OSError, ImportError, AttributeError):
        pass


def main() -> int:
    lower_priority()
    # Keep stdout for events only: fd 1 now points at stderr, events go to a private copy.
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()
    detached = threading.Event()
    recorder = []  # the ledger recorder once detached

    def sink(event: dict) -> None:
        with lock:
            if detached.is_set():
                if recorder:
                    recorder[0](event)
                return
            try:
                events.write(json.dumps(event) + "\n")
                events.flush()
            except (OSError, ValueError):  # the parent is gone
                pass

    line = sys.stdin.readline()
    from .spec import JobSpec
    try:
        spec = JobSpec.from_dict(json.loads(line))
    except (ValueError, TypeError) as e:
        sink({"type": "error", "job_id": None, "kind": "spec", "message": f"bad job spec: {e}"})
        sink({"type": "finished", "job_id": None})
        return 2
    cancel = threading.Event()

    def watch_stdin():
        for cmd in sys.stdin:
            if cmd.strip() == "cancel":
                cancel.set()
            elif cmd.strip() == "detach":
                from .. import paths
                from ..ledger import Ledger
                from .client import Recorder
                # the parent's stderr pipe dies with it: keep this job's output in a log file instead
                logs = paths.data_dir() / "logs"
                logs.mkdir(parents=True, exist_ok=True)
                out = os.open(str(logs / f"worker-{spec.job_id}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(out, 2)
                os.dup2(out, 1)
                with lock:
                    recorder.append(Recorder(Ledger(), spec, started=True))
                    detached.set()
                return  # stdin closing no longer means "cancel"
        cancel.set()  # parent gone

    threading.Thread(target=watch_stdin, daemon=True).start()
    import faulthandler
    faulthandler.enable(sys.stderr)
    from .run import run_job
    run_job(spec, sink, cancel.is_set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
