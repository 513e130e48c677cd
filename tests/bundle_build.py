"""The desktop bundle's build for a test session. `installer/build` takes ~6 minutes, nearly all of
it one core of PyInstaller's analysis; run in the foreground it was a third of the suite. So the
session starts it in the background as soon as tests/test_bundle.py is collected, at the lowest CPU
priority (the other tests' processes win every contested core), runs the bundle's tests last, and
their `bundle` fixture waits for it. Tests that measure timing run after it ended (marker
`quiet_machine`). A build is reused while its sources are unchanged (a hash of core/, gui/,
resources/, installer/, pyproject.toml)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "installer" / "dist"
APP = DIST / "squeeze-studio" / "squeeze-studio"
STAMP = DIST / ".source-sha256"
LOG = ROOT / "installer" / ".build-test.log"
SOURCES = ("core", "gui", "resources", "installer/squeeze-studio.spec", "installer/entry.py", "installer/build",
           "pyproject.toml")

_build: dict = {}  # "proc", "want", "t0" while a build runs


def source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        p = ROOT / name
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def up_to_date(want: str) -> bool:
    return APP.is_file() and STAMP.is_file() and STAMP.read_text() == want


def start() -> None:
    """Starts `installer/build` in the background unless the last build is current or one runs.
    The session's .venv is set up already (it is running these tests): the build skips the set-up,
    which would otherwise rewrite the venv's scripts under the running tests' feet."""
    if _build:
        return
    want = source_hash()
    if up_to_date(want):
        return
    STAMP.unlink(missing_ok=True)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    log = LOG.open("w")
    proc = subprocess.Popen([str(ROOT / "installer" / "build")], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, SQUEEZE_BUILD_NO_SETUP="1"),
                            preexec_fn=(lambda: os.nice(19)) if hasattr(os, "nice") else None)
    log.close()
    _build.update(proc=proc, want=want, t0=time.monotonic())


def wait(timeout: float = 1800) -> Path:
    """The built app, once the background build (if any) ended; an AssertionError with the build's
    log tail if it failed."""
    if not _build:
        start()  # (a caller that skipped collection's start)
    if _build:
        proc = _build["proc"]
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"installer/build ran past {timeout:.0f} s; see {LOG}") from None
        tail = LOG.read_text(errors="replace")[-6000:]
        assert rc == 0, f"installer/build failed (exit {rc}):\n{tail}"
        assert APP.is_file(), f"installer/build exited 0 but wrote no {APP.relative_to(ROOT)}"
        STAMP.write_text(_build["want"])
        print(f"\n[bundle] built in the background in {time.monotonic() - _build['t0']:.0f} s: "
              f"{tail.strip().splitlines()[-2:]}")
        _build.clear()
    return APP


def running() -> bool:
    return bool(_build) and _build["proc"].poll() is None
