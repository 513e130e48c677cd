"""A job in the worker process, seen from Qt: each event of `core.jobs.client.WorkerJob` (called
on its reader thread) is re-emitted as a signal, delivered queued on the GUI thread."""
from __future__ import annotations

import threading

from PySide6.QtCore import QObject, QTimer, Signal

from core.jobs.client import WorkerJob
from core.jobs.spec import JobSpec
from core.ledger import Ledger


class WorkerClient(QObject):
    # object, not dict: a dict signal copies the event into a QVariantMap and back at each emit (the
    # queued hop and the re-emit): tens of ms of GUI thread for a weight view's result on SmolLM2
    started = Signal(object)
    progress = Signal(object)
    log = Signal(object)
    result = Signal(object)
    error = Signal(object)
    cancelled = Signal(object)
    finished = Signal(object)
    metric = Signal(object)  # a point of a numeric series (distill's loss per step)
    EVENTS = ("started", "progress", "log", "result", "error", "cancelled", "finished", "metric")
    _event = Signal(object)  # emitted from the reader thread; queued to this object's thread

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.job: WorkerJob | None = None
        self._busy = False
        self._event.connect(self._dispatch)

    def start(self, spec: JobSpec, ledger: Ledger | None = None) -> WorkerJob:
        """Starts the job's process from a helper thread (spawning a process and writing the ledger
        row take 20-30 ms: not on the GUI thread); a cancel or kill asked for meanwhile is applied
        as soon as the process exists. A failure to start arrives as an error event."""
        if self.running:
            raise RuntimeError("a job is already running")
        self._busy = True
        self._launched = threading.Event()
        self._pending: str | None = None
        job = self.job = WorkerJob(spec, self._event.emit, ledger)

        def launch():
            try:
                job.start()  # a failure to start is reported (and recorded) by the job as error + finished
            except Exception as e:  # noqa: BLE001 - the ledger itself could not be written: still end the job
                self._event.emit({"type": "error", "job_id": spec.job_id, "kind": "start",
                                  "message": f"cannot start the job: {e}"})
                self._event.emit({"type": "finished", "job_id": spec.job_id})
            finally:
                self._launched.set()
            if self._pending:
                getattr(job, self._pending)()

        threading.Thread(target=launch, daemon=True, name="worker-launch").start()
        return job

    def wait_started(self, timeout: float = 30) -> bool:
        """Blocks until the process exists (for the few callers that need its pid)."""
        return self._launched.wait(timeout) if self.job else False

    def _dispatch(self, e: dict) -> None:
        kind = e.get("type")
        if kind in ("result", "finished"):
            # each in its own slice of the event loop: arriving together, their slots (table, plots)
            # would otherwise run back to back and hold the GUI thread for one long stretch (1 ms, not 0: a
            # 0 ms single shot is a posted event, run in one batch with the repaint of what came before)
            QTimer.singleShot(1 if kind == "result" else 20, self, lambda: self._deliver(kind, e))
        elif kind in self.EVENTS:
            getattr(self, kind).emit(e)

    def _deliver(self, kind: str, e: dict) -> None:
        if kind == "finished":
            self._busy = False  # before the signal: a slot may start the next job
        getattr(self, kind).emit(e)

    @property
    def running(self) -> bool:
        """Until `finished` is delivered here (the reader thread may still be winding down)."""
        return self._busy

    @property
    def pid(self) -> int | None:
        return self.job.pid if self.job else None

    def _act(self, what: str) -> None:
        if not self.job:
            return
        if self._launched.is_set():
            getattr(self.job, what)()
        else:
            self._pending = what  # the launcher applies it once the process exists

    def cancel(self) -> None:
        self._act("cancel")

    def kill(self) -> None:
        self._act("kill")
