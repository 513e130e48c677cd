"""A job in the worker process, seen from Qt: each event of `core.jobs.client.WorkerJob` (called
on its reader thread) is re-emitted as a signal, delivered queued on the GUI thread."""
from __future__ import annotations

from PySide6.QtCore import QObject, Signal

from core.jobs.client import WorkerJob
from core.jobs.spec import JobSpec
from core.ledger import Ledger


class WorkerClient(QObject):
    started = Signal(dict)
    progress = Signal(dict)
    log = Signal(dict)
    result = Signal(dict)
    error = Signal(dict)
    cancelled = Signal(dict)
    finished = Signal(dict)
    metric = Signal(dict)  # a point of a numeric series (distill's loss per step)
    EVENTS = ("started", "progress", "log", "result", "error", "cancelled", "finished", "metric")
    _event = Signal(dict)  # emitted from the reader thread; queued to this object's thread

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.job: WorkerJob | None = None
        self._busy = False
        self._event.connect(self._dispatch)

    def start(self, spec: JobSpec, ledger: Ledger | None = None) -> WorkerJob:
        if self.running:
            raise RuntimeError("a job is already running")
        self._busy = True
        try:
            self.job = WorkerJob(spec, self._event.emit, ledger).start()
        except BaseException:
            self._busy = False
            raise
        return self.job

    def _dispatch(self, e: dict) -> None:
        kind = e.get("type")
        if kind == "finished":
            self._busy = False  # before the signal: a slot may start the next job
        if kind in self.EVENTS:
            getattr(self, kind).emit(e)

    @property
    def running(self) -> bool:
        """Until `finished` is delivered here (the reader thread may still be winding down)."""
        return self._busy

    @property
    def pid(self) -> int | None:
        return self.job.pid if self.job else None

    def cancel(self) -> None:
        if self.job:
            self.job.cancel()

    def kill(self) -> None:
        if self.job:
            self.job.kill()
