"""Before a job starts: estimated peak RAM, disk and time, from the model's size, the recipe,
the evaluation settings and what earlier runs on this machine really used (each finished run
keeps its estimate beside its measured peak RSS and duration, so estimates correct themselves).
A job that needs more RAM or disk than is free is refused with one clear line. No torch here:
the GUI calls it on its own thread."""
from __future__ import annotations

import shutil
import statistics

from .errors import PreflightError

RUNTIME_BYTES = 600e6       # python + torch + transformers, imported, before any model
CALIBRATED = {"gptq", "awq", "smoothquant", "weight_sharing", "wanda", "sparsegpt", "low_rank", "early_exit", "moefy",
              "structured_prune"}
TRAINING = {"distill"}
EVAL_TOKENS_PER_S_PER_MPARAM = 300 * 135  # ~300 tok/s scored on a 135M model, 2 cores (bench/RESULTS.md)
HEADROOM = 0.9              # refuse when the estimate passes 90 % of what is free


def _step_extra(step: dict, model_bytes: float, hidden: int, ctx: dict) -> float:
    """Bytes a step holds beyond the model itself while it runs."""
    name = step.get("technique")
    if name in TRAINING:  # teacher copy + gradients + Adam's two moments
        return 4.0 * model_bytes
    if name in CALIBRATED:
        samples, seq = step.get("samples", 64), step.get("seq_len", 512)
        acts = 3 * samples * seq * max(hidden, 1) * 4 * 4      # layer inputs/outputs, the MLP's wide ones
        hess = 7 * (4 * max(hidden, 1)) ** 2 * 4               # one layer's Hessians (down_proj's is the widest)
        return acts + hess + 0.1 * model_bytes
    return 0.15 * model_bytes


def estimate(params: int, hidden: int | None, vocab: int | None, recipe: dict, eval_settings: dict,
             kind: str = "eval", history: list[dict] | None = None) -> dict:
    """-> {ram_bytes, disk_bytes, seconds, correction}: peak RSS, bytes written, and wall time."""
    model_bytes = params * 4.0
    hidden = hidden or int((params / 12 / 30) ** 0.5)
    vocab = vocab or 50_000
    steps = (recipe or {}).get("steps") or []
    ctx = eval_settings.get("context", 512)
    extra = max((_step_extra(s, model_bytes, hidden, ctx) for s in steps), default=0.0)
    logits = ctx * vocab * 4 * 3                                 # a window's logits, log-softmax, gather
    ram = RUNTIME_BYTES + model_bytes + extra + logits
    if steps:
        ram += 0.3 * model_bytes                                 # saving and loading the variant back
    if kind == "export":
        ram += 3.0 * model_bytes                                 # the tracer's graph + onnxruntime's session
    disk = (model_bytes if steps else 0) + (model_bytes * 1.3 if kind == "export" else 0)
    mparams = params / 1e6
    tokens = eval_settings.get("max_tokens", 4096)
    seconds = tokens / (EVAL_TOKENS_PER_S_PER_MPARAM / max(mparams, 1)) + 20
    seconds += sum(_step_seconds(s, mparams) for s in steps)
    if kind == "export":
        seconds = seconds * 3 + mparams * 0.4
    est = {"ram_bytes": ram, "disk_bytes": disk, "seconds": seconds, "correction": 1.0}
    return correct(est, steps, kind, history or [])


def _step_seconds(step: dict, mparams: float) -> float:
    name = step.get("technique")
    if name in TRAINING:
        return step.get("steps", 200) * 0.02 * mparams
    if name in CALIBRATED:
        return 1.2 * mparams * (2 if step.get("sequential") else 1) * step.get("samples", 64) / 64
    return 0.05 * mparams


def signature(steps: list[dict], kind: str) -> str:
    return kind + ":" + "+".join(s.get("technique", "?") for s in steps)


def correct(est: dict, steps: list[dict], kind: str, history: list[dict]) -> dict:
    """Scales the estimate by the median actual/estimate of earlier finished runs of the same
    kind of recipe on this machine (the ledger keeps both)."""
    sig = signature(steps, kind)
    ram_r, time_r = [], []
    for r in history:
        res = r.get("result") or {}
        pre = res.get("preflight") or {}
        if r.get("status") != "done" or pre.get("signature") != sig:
            continue
        if res.get("peak_rss_bytes") and pre.get("raw_ram_bytes"):
            ram_r.append(res["peak_rss_bytes"] / pre["raw_ram_bytes"])
        if res.get("seconds") and pre.get("raw_seconds"):
            time_r.append(res["seconds"] / pre["raw_seconds"])
    out = {**est, "raw_ram_bytes": est["ram_bytes"], "raw_seconds": est["seconds"], "signature": sig,
           "history_runs": len(ram_r)}
    if ram_r:
        out["ram_bytes"] = est["ram_bytes"] * statistics.median(ram_r)
        out["correction"] = statistics.median(ram_r)
    if time_r:
        out["seconds"] = est["seconds"] * statistics.median(time_r)
    return out


def free_ram() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


def free_disk(path) -> int:
    return int(shutil.disk_usage(path).free)


def _size(b: float) -> str:
    return f"{b / 1e9:.1f} GB" if b >= 1e9 else f"{b / 1e6:.0f} MB"


def check(est: dict, workspace) -> None:
    """Refuses a job that cannot fit, saying what it needs, what is free and what to do."""
    ram, disk = free_ram(), free_disk(workspace)
    if est["ram_bytes"] > HEADROOM * ram:
        raise PreflightError(f"this job needs about {_size(est['ram_bytes'])} of RAM and {_size(ram)} is "
                             "free: close other programs, or use fewer calibration samples, a shorter context or a "
                             "smaller model")
    if est["disk_bytes"] > HEADROOM * disk:
        raise PreflightError(f"this job writes about {_size(est['disk_bytes'])} and {_size(disk)} is "
                             f"free in {workspace}: free some disk space or delete old variants and exports")


def for_spec(spec, model_info=None, history: list[dict] | None = None) -> dict:
    """The estimate of a JobSpec (eval or export), from the model's facts and the ledger."""
    from . import models
    info = model_info or models.info(spec.model, convert=False)
    if not info.params:
        return {}
    vocab = None
    if info.path:
        import json
        from pathlib import Path
        try:
            vocab = json.loads(Path(info.path, "config.json").read_text()).get("vocab_size")
        except (OSError, ValueError):
            pass
    if history is None:
        from .ledger import Ledger
        history = Ledger().rows(spec.model)
    return estimate(info.params, info.hidden_size, vocab, spec.recipe, spec.eval, spec.kind, history)
