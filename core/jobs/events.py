"""The event contract, one for every job:

    started(job_id) -> progress(stage, fraction, eta_s, step_eta_s)*, log(level, text)* and metric(name, step, value)*
    -> exactly one of result(payload) | error(kind, message) | cancelled() -> finished()

Events are plain dicts {"type": ..., ...}; the worker process writes them as JSON lines.
`eta_s` is the job's stage-weighted guess; `step_eta_s`, when a step times itself (distill's
training loop), that step's own estimate of its time left: the better number while it runs.
A worker that dies without `finished` is reported by its parent as error("crashed", ...).
"""
from __future__ import annotations

import time
from typing import Callable

STAGES = ("load", "apply", "save", "evaluate", "export", "verify")


def shown_eta(e: dict) -> tuple[float | None, str]:
    """The ETA a progress event shows (GUI and CLI): a step's own over the job's guess, and which it is."""
    if e.get("step_eta_s") is not None:
        return e["step_eta_s"], "this step: "
    return e.get("eta_s"), ""


class Emitter:
    """Turns stage progress into overall fraction + ETA and calls `sink(event)`."""

    def __init__(self, sink: Callable[[dict], None], job_id: str, weights: dict[str, float]):
        self.sink = sink
        self.job_id = job_id
        total = sum(weights.values()) or 1.0
        self.weights = {k: v / total for k, v in weights.items()}
        self.t0 = time.monotonic()
        self.stage = None
        self._last = 0.0

    def emit(self, type_: str, **kw) -> None:
        self.sink({"type": type_, "job_id": self.job_id, **kw})

    def started(self) -> None:
        self.emit("started")

    def progress(self, stage: str, stage_fraction: float, note: str = "", step_eta_s: float | None = None) -> None:
        done = 0.0
        for s, w in self.weights.items():
            if s == stage:
                done += w * stage_fraction
                break
            done += w
        now = time.monotonic()
        if stage == self.stage and stage_fraction < 1.0 and now - self._last < 0.1:
            return  # at most ~10 events a second
        self.stage, self._last = stage, now
        elapsed = now - self.t0
        eta = elapsed * (1 - done) / done if done > 0.02 else None
        self.emit("progress", stage=stage, fraction=round(done, 4), stage_fraction=round(stage_fraction, 4),
                  eta_s=round(eta, 1) if eta is not None else None, note=note,
                  step_eta_s=round(step_eta_s, 1) if step_eta_s is not None else None)

    def log(self, text: str, level: str = "info") -> None:
        self.emit("log", level=level, text=text)

    def metric(self, name: str, step: int, value: float) -> None:
        """One point of a numeric series (e.g. distill_loss per training step), for a live plot."""
        self.emit("metric", name=name, step=int(step), value=float(value))

    def result(self, payload: dict) -> None:
        self.emit("result", payload=payload)

    def error(self, kind: str, message: str) -> None:
        self.emit("error", kind=kind, message=message)

    def cancelled(self) -> None:
        self.emit("cancelled")

    def finished(self) -> None:
        self.emit("finished")
