"""Running the built bundle as a user would: a fresh home with none of the developer's paths, and
a virtual X screen (Xvfb). Shared by tests/test_bundle.py and bench/bundle.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

LEAKS = ("PYTHONPATH", "VIRTUAL_ENV", "SQUEEZE_HOME", "QT_QPA_PLATFORM", "DISPLAY", "QT_PLUGIN_PATH")


def fresh_env(home: Path, display: str | None = None) -> dict:
    """The environment of a first start: own home and XDG dirs, offline, offscreen unless a display."""
    env = {k: v for k, v in os.environ.items() if k not in LEAKS}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"),
               XDG_CACHE_HOME=str(home / ".cache"), HF_HUB_OFFLINE="1", PATH="/usr/bin:/bin",
               QT_QPA_PLATFORM="xcb" if display else "offscreen")
    if display:
        env["DISPLAY"] = display
    return env


def start_xvfb(log: Path, screen: str = "1280x800x24") -> tuple[subprocess.Popen, str]:
    """-> (server, ":N") on the first display number with neither a lock file nor a socket left:
    a stale socket from a server that died without its lock file would otherwise be picked
    (Xvfb's -displayfd looks at lock files only) and the new server could not listen there."""
    exe = shutil.which("Xvfb")
    if not exe:
        raise RuntimeError("Xvfb is not installed: install it with `apt install xvfb libxcb-cursor0 libxcb-icccm4 "
                           "libxcb-keysyms1` (./studio test does this as root)")
    n = next(n for n in range(10, 1000)
             if not Path(f"/tmp/.X{n}-lock").exists() and not Path(f"/tmp/.X11-unix/X{n}").exists())
    sock = Path(f"/tmp/.X11-unix/X{n}")
    with open(log, "wb") as err:  # a file, not a pipe: a full pipe would stall the server
        # -noreset: no server reset (and its side effects) when the last client leaves
        proc = subprocess.Popen([exe, f":{n}", "-screen", "0", screen, "-nolisten", "tcp", "-noreset"],
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 15
    while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None or not sock.exists():
        proc.kill()
        raise RuntimeError(f"Xvfb did not start on :{n}: {Path(log).read_text()[-2000:]}")
    return proc, f":{n}"
