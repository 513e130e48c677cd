"""Before a job starts: estimated peak RAM, disk and time, from the model's size, the recipe,
the evaluation settings and what earlier runs on this machine really used (each finished run
keeps its estimate beside its measured peak RSS and duration, so estimates correct themselves).
A job that needs more RAM or disk than is free is refused with one clear line. No torch here:
the GUI calls it on its own thread."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from .errors import PreflightError, SqueezeError

RUNTIME_BYTES = 600e6       # python + torch + transformers, imported, before any model
CALIBRATED = {"gptq", "awq", "smoothquant", "weight_sharing", "wanda", "sparsegpt", "low_rank", "early_exit", "moefy",
              "structured_prune"}
TRAINING = {"distill"}
EVAL_TOKENS_PER_S_PER_MPARAM = 300 * 135  # ~300 tok/s scored on a 135M model, 2 cores (bench/RESULTS.md)
HEADROOM = 0.9              # refuse when the estimate passes 90 % of what is free


def _shape(params: int, hidden: int | None, vocab: int | None, layers: int | None, intermediate: int | None) -> dict:
    """The model's sizes, read from its config where known, guessed for a Llama-like model otherwise."""
    hidden = hidden or int((params / 12 / 30) ** 0.5)
    return {"hidden": hidden, "vocab": vocab or 50_000, "layers": layers or max(1, round(params / (12 * hidden ** 2))),
            "intermediate": intermediate or 4 * hidden}


def _step_ram(step: dict, model_bytes: float, s: dict) -> float:
    """Bytes a step holds beyond the runtime and the model while it runs (the step's own phase)."""
    name = step.get("technique")
    h, inter, vocab = s["hidden"], s["intermediate"], s["vocab"]
    if name in TRAINING:
        tokens = step.get("batch_size", 4) * step.get("seq_len", 256)
        trainable = max(model_bytes - vocab * h * 4, 0.2 * model_bytes)  # the (tied) embedding stays frozen
        saved = s["layers"] * tokens * (16 * h + 6 * inter) * 4          # what backward keeps per decoder layer
        logits = 6 * tokens * vocab * 4     # teacher's and student's logits, softened, log-softmax, their gradient
        return model_bytes + 3 * trainable + saved + logits               # + the teacher, gradients, Adam's moments
    if name in CALIBRATED:              # one decoder layer at a time: its inputs and the widest Hessian
        acts = step.get("samples", 64) * step.get("seq_len", 512) * h * 4
        calib = acts + max(h, inter) ** 2 * 4 + 0.05 * model_bytes
        if step.get("reconstruct"):  # the unpruned teacher, and its hidden states beside the student's
            calib += model_bytes + acts
        if not _loss_gradients(step):
            return calib
        tokens = 2 * step.get("seq_len", 512)  # calibration.grad_moments: backward over 2 windows at a time
        return max(calib, s["layers"] * tokens * (16 * h + 6 * inter) * 4 + 3 * tokens * vocab * 4)
    return 0.05 * model_bytes


def _loss_gradients(step: dict) -> bool:
    """Whether the step runs a backward pass for loss gradients (calibration.grad_moments)."""
    from .techniques import registry
    try:
        cfg = registry.get(step["technique"]).make({k: v for k, v in step.items() if k != "technique"})
    except Exception:  # an invalid step is reported by the recipe check, not here
        return False
    return bool(getattr(cfg, "uses_loss_gradients", False))  # the technique's own rule


def _kept(step: dict, model_bytes: float, s: dict) -> float:
    """Fraction of the model's bytes a shape-changing step keeps (the variant evaluated is smaller)."""
    name = step.get("technique")
    h, inter = s["hidden"], s["intermediate"]
    linear = max(model_bytes - s["vocab"] * h * 4, 0.0) / model_bytes    # share of the decoder layers' weights
    if name == "low_rank":
        return 1 - linear * (1 - step.get("keep", 0.8))
    if name == "structured_prune":
        ffn = 3 * h * inter / (3 * h * inter + 3 * h * h)                   # FFN's share of a layer (GQA attention)
        layer = 1 - ffn * step.get("ffn", 0.3) - (1 - ffn) * 0.5 * step.get("heads", 0.0)
        return 1 - linear * (1 - (1 - step.get("layers", 0.0)) * layer)
    return 1.0


def estimate(params: int, hidden: int | None, vocab: int | None, recipe: dict, eval_settings: dict,
             kind: str = "eval", history: list[dict] | None = None, layers: int | None = None,
             intermediate: int | None = None, reused: int = 0) -> dict:
    """-> {ram_bytes, disk_bytes, seconds, correction}: peak RSS, bytes written, and wall time.
    Peak RSS is the larger of two phases: building the variant (each step with the model it
    starts from) and evaluating it (the variant as saved and loaded back, plus a window's logits).
    `reused`: leading steps a saved variant already holds (core.reuse): no time for them."""
    model_bytes = params * 4.0
    s = _shape(params, hidden, vocab, layers, intermediate)
    steps = (recipe or {}).get("steps") or []
    ctx = eval_settings.get("context", 512)
    build, size = 0.0, model_bytes
    for st in steps:
        build = max(build, size + _step_ram(st, size, s))
        size *= _kept(st, size, s)
    after = size
    evaluate = after + ctx * s["vocab"] * 4 * 3                   # a window's logits, log-softmax, gather
    if steps:
        evaluate += 0.3 * after                                  # saving and loading the variant back
    if any(_packs(st) for st in steps):
        evaluate += 0.55 * model_bytes                           # packed tensors beside their float weights
    if kind == "export":
        evaluate += 3.0 * after                                  # the exporter's graph + onnxruntime's session
    ram = RUNTIME_BYTES + max(build, evaluate)
    disk = (after if steps else 0) + (after * 1.3 if kind == "export" else 0)
    mparams = params / 1e6
    tokens = eval_settings.get("max_tokens", 4096)
    seconds = tokens / (EVAL_TOKENS_PER_S_PER_MPARAM / max(mparams, 1)) + 20
    seconds += sum(_step_seconds(st, mparams) for st in steps[reused:])
    if kind == "export":
        seconds = seconds * 3 + mparams * 0.4
    est = {"ram_bytes": ram, "disk_bytes": disk, "seconds": seconds, "correction": 1.0}
    return correct(est, steps, kind, history or [])


def _packs(step: dict) -> bool:
    """Whether the step stores packed low-bit tensors (registry metadata; no torch imported)."""
    from .techniques import registry
    try:
        return registry.get(step.get("technique")).packs
    except registry.RecipeError:  # an unknown name is the recipe check's to report, not the estimate's
        return False


def _config(step: dict):
    """The step's full config (its defaults filled in), without importing torch."""
    from .techniques import registry
    tech = registry.get(step["technique"])
    try:
        return tech.make({k: v for k, v in step.items() if k != "technique"})
    except registry.RecipeError:  # a bad value is the recipe check's to report: estimate the defaults
        return tech.make()


def _step_seconds(step: dict, mparams: float) -> float:
    name = step.get("technique")
    if name in TRAINING:
        cfg = _config(step)
        # ~11 s a step of 1,024 tokens for SmolLM2-135M in fp32 on 2 cores (3.6 s in bf16); a budget caps it
        seconds = cfg.steps * cfg.batch_size * cfg.seq_len / 1024 * 0.08 * mparams
        return min(seconds, cfg.minutes * 60) if cfg.minutes > 0 else seconds
    if name in CALIBRATED:
        seconds = calibration_seconds(step.get("samples", 64), bool(step.get("sequential")), mparams)
        if step.get("reconstruct"):
            cfg = _config(step)
            seconds += reconstruct_seconds(cfg.reconstruct, cfg.samples, cfg.seq_len, mparams)
        return seconds
    return 0.05 * mparams


def calibration_seconds(samples: int, sequential: bool, mparams: float) -> float:
    """A calibrated step's statistics and solve (a sequential one runs every layer twice)."""
    return 1.2 * mparams * (2 if sequential else 1) * samples / 64


def reconstruct_seconds(epochs: int, samples: int, seq_len: int, mparams: float) -> float:
    """sparsegpt / wanda `reconstruct`: every layer's forward + backward per pass over the windows; measured
    89 s a pass over 32 x 512 tokens for SmolLM2-135M on 2 cores (bench/RESULTS.md, sgpt-rec-b vs sgpt-rec16)."""
    return epochs * samples * seq_len / 1024 * 0.041 * mparams


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
        if res.get("seconds") and pre.get("raw_seconds"):  # (a run's raw estimate left its reused steps out too)
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
    cfg = {}
    if info.path:
        try:
            cfg = json.loads(Path(info.path, "config.json").read_text())
        except (OSError, ValueError):
            pass
    if history is None:
        from .ledger import Ledger
        history = Ledger().rows(spec.model)
    reused = 0
    steps = (spec.recipe or {}).get("steps") or []
    if info.path and steps and getattr(spec, "reuse", True):
        from .recipe import from_data
        from .reuse import saved_prefix
        try:
            full = from_data(spec.recipe).to_dict()["steps"]  # as saved: every field filled in
        except SqueezeError:
            full = None
        found = full and saved_prefix(spec.model, Path(info.path), full)
        reused = found[1] if found else 0
    est = estimate(info.params, info.hidden_size, cfg.get("vocab_size"), spec.recipe, spec.eval, spec.kind, history,
                   layers=cfg.get("num_hidden_layers"), intermediate=cfg.get("intermediate_size"), reused=reused)
    return {**est, "reused": reused} if reused else est
