"""Size and duration of an export before it starts (plain Python: the GUI calls it, and must not
import onnxruntime or torch)."""
from __future__ import annotations

from .quantize import CANDIDATES_FOR

# Size of the verified export / fp32 ONNX, measured on SmolLM2-135M (bench/RESULTS.md, "peers-onnx").
SIZE_FACTOR = {None: 1.0, "int8": 0.27, "int4": 0.19}
TRACE_S_PER_MPARAM = 0.4   # tracing + saving, seconds per million parameters (measured, 2 cores)


def estimate(params: int, quantize: str | None, settings, prefill_tokens_per_s: float | None,
             decode_tokens_per_s: float | None) -> dict:
    """Size and duration of an export before it starts, from the run's own measurements: the
    file is ~4 bytes per parameter times the target's factor; the time is the trace plus one
    verification pass (the eval's tokens at the measured prefill rate, the decode benchmark) per
    written file (the fp32 file and each candidate)."""
    files = 1 + (0 if quantize is None else len(CANDIDATES_FOR[quantize]))
    eval_s = settings.max_tokens / prefill_tokens_per_s if prefill_tokens_per_s else 0.0
    if decode_tokens_per_s:
        eval_s += (settings.repeats + 1) * settings.new_tokens / decode_tokens_per_s
    return {"size_bytes": params * 4 * SIZE_FACTOR[quantize],
            "seconds": params / 1e6 * TRACE_S_PER_MPARAM + files * eval_s + eval_s}  # + torch's own measure


