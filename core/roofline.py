"""The decode speed this machine's memory allows: greedy decoding reads every weight once per
token, so tokens/s <= bandwidth / bytes of weights read per token. The bandwidth is measured
once (a short numpy copy) and cached per machine.
"""
from __future__ import annotations

import json
import os
import platform
import time

import numpy as np

COPY_BYTES = 256 * 2**20   # well past the last-level cache
REPEATS = 5


def _cache_file():
    from .paths import cache_dir
    return cache_dir() / "bandwidth.json"


def _machine() -> str:
    from .about import machine
    m = machine()
    return f"{platform.node()}|{m['machine']}|{platform.processor()}|{m['cores']}"


def measure_bandwidth(nbytes: int = COPY_BYTES, repeats: int = REPEATS) -> float:
    """Bytes/s of a large array copy (read + write counted), best of `repeats`."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)  # touch both
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best


def bandwidth(refresh: bool = False) -> float:
    """This machine's memory bandwidth in bytes/s: measured once, then read from the cache."""
    f = _cache_file()
    key = _machine()
    if not refresh:
        try:
            got = json.loads(f.read_text())
            if got.get("machine") == key and got.get("bytes_per_s", 0) > 0:
                return float(got["bytes_per_s"])
        except (OSError, ValueError):
            pass
    bw = measure_bandwidth()
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": key, "bytes_per_s": bw, "measured": time.time()}))
    os.replace(tmp, f)
    return bw


def torch_bytes_per_token(model) -> int:
    """Weight bytes a decode step reads: every parameter once (shared ones once), except an
    untied embedding table, of which one row is read."""
    seen, total = set(), 0
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and emb is not None and head.weight is emb
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if p is emb and not tied:
            total += p.shape[-1] * p.element_size()
            continue
        total += p.numel() * p.element_size()
    return total


def onnx_bytes_per_token(model_file) -> int:
    """Initializer bytes a decode step reads: all of them, except tables only gathered from
    (an untied embedding: one row per token)."""
    import onnx
    from onnx import helper

    m = onnx.load(str(model_file), load_external_data=False)
    consumers: dict[str, set] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, set()).add(n.op_type)
    total = 0
    for t in m.graph.initializer:
        size = int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        ops = consumers.get(t.name, set())
        if ops and ops <= {"Gather", "GatherBlockQuantized"} and len(t.dims) >= 2:
            size = size // t.dims[0]  # one row per token
        total += size
    return total


def bound(bytes_per_token: int, bytes_per_s: float | None = None) -> float:
    """tokens/s the bandwidth allows for that many weight bytes per token."""
    return (bytes_per_s or bandwidth()) / max(bytes_per_token, 1)
