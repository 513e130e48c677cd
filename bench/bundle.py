"""The desktop bundle: size, and start to a rendered main window, cold and warm, offscreen and on
a virtual X screen (Xvfb).

    .venv/bin/python bench/bundle.py [--build] [--repeats 3]

Cold = the kernel's page cache dropped before each start (`/proc/sys/vm/drop_caches`, needs root;
otherwise each bundle file is evicted with posix_fadvise(DONTNEED)), so every library is read from
disk as on a first start after boot. The time is `squeeze-studio --screenshot x.png`, which
starts, shows the window, reads the model facts, renders the window to a PNG and exits: an upper
bound on "window visible". Rewrites the "bundle" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402
from results_md import write_section  # noqa: E402

sys.path.insert(0, str(ROOT / "installer"))
from fresh import fresh_env, start_xvfb  # noqa: E402

DIST = ROOT / "installer" / "dist"
APP_DIR = DIST / "squeeze-studio"
APP = APP_DIR / "squeeze-studio"


def drop_caches() -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for f in APP_DIR.rglob("*"):
            if f.is_file() and not f.is_symlink():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "posix_fadvise"


def start_seconds(home: Path, display: str | None) -> float:
    shot = home / "shot.png"
    t0 = time.perf_counter()
    r = subprocess.run([str(APP), "--screenshot", str(shot)], env=fresh_env(home, display), capture_output=True,
                       text=True, timeout=120)
    dt = time.perf_counter() - t0
    if r.returncode != 0 or not shot.is_file():
        raise SystemExit(f"start failed ({r.returncode}): {r.stderr[-2000:]}")
    shot.unlink()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="run installer/build first and time it")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    build = ""
    if a.build:
        t0 = time.monotonic()
        subprocess.run([str(ROOT / "installer" / "build")], cwd=ROOT, check=True)
        build = f"`installer/build` took **{time.monotonic() - t0:.0f} s** on this machine. "
    if not APP.is_file():
        raise SystemExit("no bundle: run installer/build (or this script with --build) first")
    unpacked = sum(f.stat().st_size for f in APP_DIR.rglob("*") if f.is_file() and not f.is_symlink())
    packs = sorted(DIST.glob("squeeze-studio-*-linux-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    home = Path(tempfile.mkdtemp(prefix="squeeze-bundle-bench-"))
    start_seconds(home, None)  # first start of a fresh home writes its settings; not timed
    rows, how = [], ""
    xproc, display = start_xvfb(home / "xvfb.log", "1440x900x24") if shutil.which("Xvfb") else (None, None)
    try:
        for platform, disp in (("offscreen", None), ("Xvfb (xcb)", display)):
            if platform.startswith("Xvfb") and not disp:
                continue
            cold, warm = [], []
            for _ in range(a.repeats):
                how = drop_caches()
                cold.append(start_seconds(home, disp))
                warm.append(start_seconds(home, disp))
            rows.append(f"| {platform} | {statistics.median(cold):.2f} s (max {max(cold):.2f}) | "
                        f"{statistics.median(warm):.2f} s (max {max(warm):.2f}) |")
            print(rows[-1], flush=True)
    finally:
        if xproc:
            xproc.terminate()
    body = f"""## Desktop bundle (issue 8): size and start time

Command: `.venv/bin/python bench/bundle.py{' --build' if a.build else ''} --repeats {a.repeats}`. {build}
Bundle (`installer/dist/squeeze-studio/`, onedir): **{unpacked / 1e6:,.0f} MB unpacked** (bar 1,200 MB)"""
    body += f", `{packs[-1].name}` {packs[-1].stat().st_size / 1e6:,.0f} MB." if packs else "."
    body += f"""

Start to a rendered main window (`squeeze-studio --screenshot x.png`: process start, window shown, model facts
read, window rendered to a PNG, exit — an upper bound on "window visible"; bar 3 s), median of {a.repeats}.
Cold: page cache dropped before each start ({how}); warm: the start right after.

| screen | cold start | warm start |
|---|---|---|
""" + "\n".join(rows) + """

The built binary's `--info`, `--version` and `--self-test` (window on the screen Qt finds + one rtn job through
the worker process on a fresh home) are run by the test suite on the built bundle, offscreen and under Xvfb:
`tests/test_bundle.py` (it runs `installer/build` when the sources changed since the last build).
"""
    write_section("bundle", body)


if __name__ == "__main__":
    main()
