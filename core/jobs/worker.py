"""The worker process: `python -m core.jobs.worker`. Reads one JobSpec (a JSON line) on stdin,
writes the contract's events as JSON lines on stdout; a later line "cancel" on stdin (or stdin
closing: the parent is gone) cancels between steps. Anything else printed goes to stderr."""
from __future__ import annotations

import json
import os
import sys
import threading


def main() -> int:
    # Keep stdout for events only: fd 1 now points at stderr, events go to a private copy.
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def sink(event: dict) -> None:
        with lock:
            events.write(json.dumps(event) + "\n")
            events.flush()

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
        cancel.set()  # parent gone

    threading.Thread(target=watch_stdin, daemon=True).start()
    import faulthandler
    faulthandler.enable(sys.stderr)
    from .run import run_job
    run_job(spec, sink, cancel.is_set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
