"""Running the built bundle as a user would: a fresh home with none of the developer's paths, and
a virtual X screen (Xvfb). Shared by tests/test_bundle.py and bench/bundle.py."""
from __future__ import annotations

import os
import shutil
import subprocess
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
    """-> (server, ":N"). The server picks a free display and writes it to a pipe (-displayfd)."""
    exe = shutil.which("Xvfb")
    if not exe:
        raise RuntimeError("Xvfb is not installed: install it with `apt install xvfb libxcb-cursor0 libxcb-icccm4 "
                           "libxcb-keysyms1` (./studio test does this as root)")
    read, write = os.pipe()
    with open(log, "wb") as err:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen([exe, "-displayfd", str(write), "-screen", "0", screen, "-nolisten", "tcp"],
                                pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=err)
    os.close(write)
    display = os.read(read, 32).decode().strip()
    os.close(read)
    if not display or proc.poll() is not None:
        raise RuntimeError(f"Xvfb did not start: {Path(log).read_text()[-2000:]}")
    return proc, f":{display}"
