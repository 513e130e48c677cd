"""Running jobs: in a worker process (the GUI; crash isolation and hard cancel) or in this
process (the CLI). Either way every event passes through `Recorder`, which keeps the ledger."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Callable

from ..ledger import Ledger
from .spec import JobSpec

CANCEL_GRACE_S = 1.2  # after this, a cancelled worker is killed: cancel always lands within 2 s


class Recorder:
    """Event sink that keeps the run's ledger row in step with its events."""

    def __init__(self, ledger: Ledger, spec: JobSpec, pid: int | None = None, started: bool = False):
        self.ledger, self.spec = ledger, spec
        self.outcome: str | None = None
        self.result: dict | None = None
        self.error: tuple[str, str] | None = None
        if not started:  # (a detached worker takes over a row its parent started)
            ledger.start(spec, pid)

    def __call__(self, e: dict) -> None:
        t = e["type"]
        if t == "result":
            self.outcome, self.result = "done", e["payload"]
            self.ledger.finish(self.spec.job_id, "done", result=e["payload"])
            if self.spec.kind == "export" and e["payload"].get("path"):
                self.ledger.replace_exports(e["payload"]["path"], self.spec.job_id)
        elif t == "error":
            self.outcome, self.error = "failed", (e["kind"], e["message"])
            self.ledger.finish(self.spec.job_id, "failed", error=e["message"])
        elif t == "cancelled":
            self.outcome = "cancelled"
            self.ledger.finish(self.spec.job_id, "cancelled", error="cancelled by the user")


def run_inline(spec: JobSpec, on_event: Callable[[dict], None] | None = None,
               ledger: Ledger | None = None, cancelled: Callable[[], bool] = lambda: False) -> Recorder:
    """The CLI path: same job, same events, same ledger, in this process."""
    import os
    from .run import run_job
    rec = Recorder(ledger or Ledger(), spec, os.getpid())

    def sink(e):
        rec(e)
        if on_event:
            on_event(e)

    try:
        run_job(spec, sink, cancelled)
    except BaseException as e:  # Ctrl-C or SIGTERM mid-job: the row says so instead of 'running' forever
        if rec.outcome is None:
            stopped = isinstance(e, KeyboardInterrupt)
            rec.outcome = "cancelled" if stopped else "failed"
            rec.ledger.finish(spec.job_id, rec.outcome, error="interrupted: the command was stopped (Ctrl-C or a "
                              "signal)" if stopped else f"internal error: {type(e).__name__}: {e}")
        raise
    return rec


def worker_command() -> list[str]:
    if getattr(sys, "frozen", False):  # the installed app: the same binary in worker mode
        return [sys.executable, "--worker"]
    return [sys.executable, "-m", "core.jobs.worker"]


class WorkerJob:
    """A job in its own process. `on_event` is called from a reader thread for every event;
    the last one is always `finished` (also when the worker crashes or is killed)."""

    def __init__(self, spec: JobSpec, on_event: Callable[[dict], None], ledger: Ledger | None = None):
        self.spec = spec
        self.on_event = on_event
        self.ledger = ledger or Ledger()
        self.proc: subprocess.Popen | None = None
        self.recorder: Recorder | None = None
        self._cancel_at: float | None = None
        self._done = threading.Event()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> "WorkerJob":
        self.recorder = Recorder(self.ledger, self.spec)
        import os
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            self.proc = subprocess.Popen(worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, encoding="utf-8", env=env, bufsize=1)
            self.ledger.set_pid(self.spec.job_id, self.proc.pid)
            self.proc.stdin.write(json.dumps(self.spec.to_dict()) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError) as e:  # recorded like any failure: the ledger row does not stay "running"
            if self.proc:
                self.proc.kill()
            self._emit({"type": "error", "job_id": self.spec.job_id, "kind": "start",
                        "message": f"cannot start the worker: {e}; check that the app is installed completely"})
            self._emit({"type": "finished", "job_id": self.spec.job_id})
            self._done.set()
            return self
        threading.Thread(target=self._read_events, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        return self

    def detach(self) -> None:
        """The app is closing but the job should finish: the worker records its own outcome in the
        ledger from now on, and stops treating a closed stdin as a cancel."""
        self._detached = True
        try:
            self.proc.stdin.write("detach\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def _emit(self, e: dict) -> None:
        if getattr(self, "_detached", False):  # the worker keeps the ledger itself now
            if e.get("type") == "finished":
                self.on_event(e)  # the job is over for this side, however it ended
            return
        try:
            self.recorder(e)
        finally:
            self.on_event(e)

    def _read_events(self) -> None:
        finished = False
        for line in self.proc.stdout:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("type") == "finished":
                finished = True
            self._emit(e)
        code = self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:  # stdin may be broken if the worker died
                pass
        if not finished:
            jid = self.spec.job_id
            if self._cancel_at is not None and self.recorder.outcome is None:
                self._emit({"type": "cancelled", "job_id": jid})
            elif self.recorder.outcome is None:
                self._emit({"type": "error", "job_id": jid, "kind": "crashed",
                            "message": f"the worker process died (exit code {code}); the app is fine, "
                                       f"the run is marked failed"})
            self._emit({"type": "finished", "job_id": jid})
        self._done.set()

    def _read_stderr(self) -> None:
        with self.proc.stderr:
            for line in self.proc.stderr:
                line = line.rstrip()
                if line:
                    self.on_event({"type": "log", "job_id": self.spec.job_id, "level": "debug", "text": line})

    def cancel(self) -> None:
        """Ask nicely, then kill: the job stops within CANCEL_GRACE_S (+ process exit)."""
        if not self.proc or self.proc.poll() is not None:
            return
        self._cancel_at = time.monotonic()
        try:
            self.proc.stdin.write("cancel\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass
        t = threading.Timer(CANCEL_GRACE_S, self.kill)
        t.daemon = True
        t.start()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def running(self) -> bool:
        return not self._done.is_set()
