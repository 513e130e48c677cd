"""Per-layer sensitivity: apply a technique to one Linear at a time (layer × q/k/v/o/gate/up/down)
and measure the change in perplexity on a short text. The hidden states entering every decoder
layer are computed once and cached, so a cell re-runs only the layers from its own onwards (and
the LM head): a scan costs about half a forward pass per cell, not a whole one.
"""
from __future__ import annotations

import math
import time
from typing import Callable

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TECHNIQUES = {"rtn": "bits", "magnitude_prune": "sparsity"}  # technique -> its setting
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def module_path(layer: int, module: str) -> str:
    """The Linear's name ending, as the techniques' `exclude` / `upgrade_8bit` fields match it."""
    return f"layers.{layer}.{PARENT[module]}.{module}"


def check_setting(technique: str, setting, group_size: int = 64) -> None:
    """One clear line for a scan the engine cannot run, before any model loads."""
    from .errors import SqueezeError
    from .techniques.quantization import GROUP_CHOICES
    if technique not in TECHNIQUES:
        raise SqueezeError(f"no sensitivity scan for {technique}; use one of {', '.join(TECHNIQUES)}")
    if technique == "rtn" and not (float(setting).is_integer() and 2 <= setting <= 8):
        raise SqueezeError(f"an rtn scan's setting is its bits, a whole number from 2 to 8; got {setting:g}")
    if technique == "magnitude_prune" and not 0 <= setting < 1:
        raise SqueezeError(f"a magnitude_prune scan's setting is its sparsity, from 0 to below 1 (e.g. 0.5); "
                           f"got {setting:g}")
    if technique == "rtn" and group_size not in GROUP_CHOICES:
        raise SqueezeError(f"group size {group_size} is not one of {', '.join(map(str, GROUP_CHOICES))} "
                           "(0 = per channel)")


def perturb(w, technique: str, setting: float, group_size: int = 64):
    """The weight (out, in) as the technique leaves it, for one Linear alone."""
    import torch
    if technique == "rtn":
        from .packing import quantize
        return quantize(w, int(setting), group_size, True).dequantize()
    if technique == "magnitude_prune":
        k = int(w.numel() * float(setting))
        if k <= 0:
            return w.clone()
        thr = w.abs().reshape(-1).kthvalue(k).values
        return torch.where(w.abs() <= thr, torch.zeros((), dtype=w.dtype), w)
    raise ValueError(f"no sensitivity scan for {technique}; use one of {', '.join(TECHNIQUES)}")


def bf16_in_hardware() -> bool:
    """True where the CPU multiplies bf16 natively (AMX or AVX-512 BF16): there a scan in bf16
    runs several times faster than in fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def scan(model, tok, text_file, technique: str = "rtn", setting: float = 4, max_tokens: int = 4096,
         context: int = 512, group_size: int = 64, progress: Callable | None = None,
         check_cancel: Callable | None = None, precision: str = "fp32") -> dict:
    """-> {layers, modules, delta_pct [layer][module] (Δ perplexity %, None where absent),
    shapes [layer][module] ((out, in) or None), other_bytes (everything but those Linears), base_ppl,
    technique, setting, group_size, tokens, seconds}."""
    import torch

    from .calibration import decoder_layers
    from .evaluate import token_windows

    windows, bos = token_windows(tok, text_file, max_tokens, context)
    layers = decoder_layers(model)
    inner = model.model
    t0 = time.perf_counter()
    if precision == "auto":
        precision = "bf16" if bf16_in_hardware() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
    # bf16: matmuls in bf16 (weights stay fp32, perturbed in fp32), the loss in fp32
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        ids = [torch.tensor([([bos] if bos is not None else []) + list(w)]) for w in windows]
        cache = []  # per window: (inputs of every layer, position embeddings, mask args)
        for x in ids:
            h = inner.embed_tokens(x)
            pos = torch.arange(x.shape[1]).unsqueeze(0)
            pe = inner.rotary_emb(h, pos)
            t = x.shape[1]
            mask = torch.full((t, t), torch.finfo(h.dtype).min).triu(1)[None, None]  # causal, any attention kernel
            ins = []
            for layer in layers:
                ins.append(h)
                h = _layer(layer, h, pe, pos, mask)
            cache.append((ins, pe, pos, mask))

        def loss_from(i: int) -> float:
            nll, n = 0.0, 0
            for x, (ins, pe, pos, mask) in zip(ids, cache):
                h = ins[i]
                for layer in layers[i:]:
                    h = _layer(layer, h, pe, pos, mask)
                logits = model.lm_head(inner.norm(h))[0, :-1].float()
                nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
                n += x.shape[1] - 1
            return nll / n

        base = loss_from(0)
        cells = [(i, m) for i in range(len(layers)) for m in MODULES]
        delta = [[None] * len(MODULES) for _ in layers]
        shapes = [[list(lin.weight.shape) if (lin := _module(layer, m)) is not None else None for m in MODULES]
                  for layer in layers]
        # what a packed variant keeps as is: embeddings, norms, (tied) LM head — float as loaded
        scanned = sum(_module(layer, m).weight.nbytes for layer in layers for m in MODULES
                      if _module(layer, m) is not None)
        other_bytes = sum(t.nbytes for t in model.parameters()) - scanned
        for k, (i, mname) in enumerate(cells):
            if check_cancel:
                check_cancel()
            lin = _module(layers[i], mname)
            if lin is None:
                continue
            w = lin.weight.data.clone()
            lin.weight.data.copy_(perturb(w, technique, setting, group_size))
            try:
                delta[i][MODULES.index(mname)] = (math.exp(loss_from(i) - base) - 1) * 100
            finally:
                lin.weight.data.copy_(w)
            if progress:
                progress((k + 1) / len(cells), f"layer {i} {mname}")
    return {"layers": len(layers), "modules": list(MODULES), "delta_pct": delta, "shapes": shapes,
            "other_bytes": other_bytes, "base_ppl": math.exp(base), "technique": technique, "setting": setting,
            "group_size": group_size, "precision": precision, "tokens": sum(x.shape[1] - 1 for x in ids),
            "seconds": round(time.perf_counter() - t0, 1)}


def _module(layer, name: str):
    for parent in (layer.self_attn, layer.mlp):
        m = getattr(parent, name, None)
        if m is not None and hasattr(m, "weight"):
            return m
    return None


def _layer(layer, h, pe, pos, mask):
    """One decoder layer, causal (explicit additive mask), no cache."""
    out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe, use_cache=False)
    return out[0] if isinstance(out, tuple) else out
