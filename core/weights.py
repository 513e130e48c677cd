"""Weight views: for every Linear of a variant, the histogram of its weights before (the base
model) and after (the variant as stored, dequantized), on the same bins so a quantization grid
or a pruning spike at zero shows, plus its bits per weight and sparsity per layer."""
from __future__ import annotations

import numpy as np

BINS = 81


def linear_weights(model) -> dict:
    """{name: (out, in) float32 numpy} of every 2-D Linear weight under the decoder layers."""
    import torch
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}":
            out[n] = m.weight.detach().float().numpy()
    return out


def _bits(name: str, packed: dict) -> float:
    qt = packed.get(f"{name}.weight")
    if qt is None:
        return 32.0
    n = qt.shape[0] * qt.shape[1]
    return 8 * qt.theoretical_bytes() / n  # codes + scales (+ zeros, outlier columns) per weight


def _codes(name: str, packed: dict) -> list[int] | None:
    """How often each integer code of a packed low-bit weight is used: the grid itself (per-group
    scales blur it in the value histogram)."""
    qt = packed.get(f"{name}.weight")
    if qt is None or not hasattr(qt, "codes") or getattr(qt, "kind", None) not in (None, "outliers") or qt.bits > 8:
        return None
    from .packing import unpack_bits
    q = unpack_bits(qt.codes, qt.bits, qt.shape[0] * qt.shape[1]).numpy()
    return np.bincount(q, minlength=2 ** qt.bits).tolist()


def compare(base, variant, packed: dict | None = None, check_cancel=None) -> dict:
    """-> {"layers": [{name, bits, sparsity_before, sparsity_after, limit, before, after, codes}]} in model
    order: before / after count the weights in BINS equal bins over [-limit, limit] (the 0.1-99.9th
    percentile of the base weight's magnitudes; outliers land in the end bins); codes: uses of each
    integer code, for packed low-bit weights. The bins go as their limit, not as BINS + 1 edges: the
    edges were 60 % of the result (0.62 MB on SmolLM2), which the GUI process parses and records while
    holding the GIL, so its event loop waits.
    Layers the variant no longer has (structured pruning) are listed with after = None."""
    packed = packed or {}
    a, b = linear_weights(base), linear_weights(variant)
    layers = []
    for name, w0 in a.items():
        if check_cancel:
            check_cancel()
        w1 = b.get(name)
        lo, hi = float(np.percentile(w0, 0.1)), float(np.percentile(w0, 99.9))
        lim = max(abs(lo), abs(hi)) or 1.0
        edges = bin_edges(lim)
        row = {"name": name, "limit": lim, "before": np.histogram(np.clip(w0, -lim, lim), edges)[0].tolist(),
               "sparsity_before": float((w0 == 0).mean()), "shape_before": list(w0.shape)}
        if w1 is None:
            row.update(after=None, sparsity_after=None, bits=None, shape_after=None, codes=None)
        else:
            row.update(after=np.histogram(np.clip(w1, -lim, lim), edges)[0].tolist(), sparsity_after=float((w1 == 0).mean()),
                       bits=_bits(name, packed), shape_after=list(w1.shape), codes=_codes(name, packed))
        layers.append(row)
    return {"layers": layers}


def bin_edges(limit: float, bins: int = BINS) -> np.ndarray:
    """The edges of `bins` equal bins over [-limit, limit] (a layer's before / after counts: its "limit")."""
    return np.linspace(-limit, limit, bins + 1)
