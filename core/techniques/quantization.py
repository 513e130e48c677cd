"""Weight quantization: round-to-nearest and dynamic-range int8.
(torch is imported inside the functions: the GUI reads these configs without loading torch.)"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from .base import StepContext, knob, target_linears
from .registry import technique

GROUP_CHOICES = (32, 64, 128, 0)
GROUP_LABELS = {0: "per-channel"}


@dataclass(frozen=True)
class RTN:
    """Round-to-nearest weight quantization of the Linear layers, stored packed."""

    bits: int = knob(4, min=2, max=8, step=1, unit="bits",
                     help="Bits per weight: 8 is near-lossless, 4 is the usual trade, 2-3 break small models.")
    group_size: int = knob(64, choices=GROUP_CHOICES, labels=GROUP_LABELS, unit="weights",
                           help="Weights sharing one scale; smaller groups are more accurate and cost more scales.")
    symmetric: bool = knob(True, help="Symmetric grid around zero (no zero-point); asymmetric fits skewed rows better.")
    lm_head: bool = knob(False, help="Also quantize the LM head (tied to the embedding: a fifth of SmolLM2's weights).")
    exclude: str = knob("", help="Linears left in float, comma-separated name endings (e.g. "
                                 "layers.0.mlp.down_proj); the sensitivity map fills this in when a cell is clicked.")
    upgrade_8bit: str = knob("", help="Linears given 8 bits instead, comma-separated name endings; the sensitivity "
                                      "map's 'mixed precision' fills this in for a size budget.")


def quantize_linears(model, ctx: StepContext, bits: int, group_size: int, symmetric: bool,
                     include_lm_head: bool, skip: tuple[str, ...] = (), eight_bit: tuple[str, ...] = ()) -> dict:
    from ..packing import quantize

    layers = [(n, m) for n, m in target_linears(model, include_lm_head) if not n.endswith(skip)]
    err, upgraded = 0.0, 0
    for i, (name, lin) in enumerate(layers):
        ctx.check_cancel()
        w = lin.weight.data
        b = 8 if eight_bit and name.endswith(eight_bit) else bits
        upgraded += b != bits
        qt = quantize(w, b, group_size, symmetric)
        deq = qt.dequantize()
        err += float(((deq - w) ** 2).sum())
        lin.weight.data.copy_(deq)  # the in-memory model now computes what the packed one will
        ctx.packed[f"{name}.weight"] = qt
        ctx.progress((i + 1) / len(layers), name)
    return {"layers": len(layers), "bits": bits, "group_size": group_size,
            "symmetric": symmetric, "sq_error": err, **({"upgraded_8bit": upgraded} if eight_bit else {})}


@technique(RTN, name="rtn", family="quantization", packs=True)
def rtn(model, cfg: RTN, ctx: StepContext) -> dict:
    return quantize_linears(model, ctx, cfg.bits, cfg.group_size, cfg.symmetric, cfg.lm_head,
                            excluded(cfg.exclude, model), excluded(cfg.upgrade_8bit, model, "upgrade_8bit"))


def excluded(text: str, model=None, field: str = "exclude") -> tuple[str, ...]:
    """'layers.0.mlp.down_proj, layers.3.self_attn.q_proj' -> name endings (matched on a dot boundary).
    Given the model, an ending that matches none of its Linears is an error: a typo would otherwise
    leave the recipe doing silently what it did without it."""
    ends = tuple("." + p.strip().lstrip(".") for p in (text or "").split(",") if p.strip())
    if model is not None and ends:
        names = ["." + n for n, _ in target_linears(model, include_lm_head=True)]
        missing = [e for e in ends if not any(n.endswith(e) for n in names)]
        if missing:
            from ..errors import RecipeError
            raise RecipeError(f"{field} {missing[0].lstrip('.')!r} matches no Linear of this model; give name "
                              "endings such as layers.0.mlp.down_proj or mlp.down_proj", field=field)
    return ends


@dataclass(frozen=True)
class DynamicInt8:
    """Dynamic-range int8: int8 weights per channel, activations quantized on the fly at run time."""

    float_down_proj: bool = knob(
        True, help="Keep the FFN down projections in float: their inputs carry the massive activations "
                   "of small models, which one int8 scale per tensor cannot hold (SmolLM2: ppl x3 without).")
    lm_head: bool = knob(False, help="Also run the LM head in int8 (it is tied to the embedding).")


@technique(DynamicInt8, name="dynamic_int8", family="quantization", packs=True)
def dynamic_int8(model, cfg: DynamicInt8, ctx: StepContext) -> dict:
    skip = ("down_proj",) if cfg.float_down_proj else ()
    info = quantize_linears(model, ctx, 8, 0, True, cfg.lm_head, skip)
    ctx.runtime.append("dynamic_int8")
    return info


def to_dynamic_int8(model, packed: dict) -> None:
    """Swap the packed int8 Linear layers for torch's dynamic-quantized Linear (fbgemm/x86 kernels),
    using the stored int8 codes and scales as they are (no re-quantization)."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DQLinear

    from ..packing import int8_codes

    for wname, qt in packed.items():
        if qt.bits != 8 or not qt.symmetric or qt.n_groups != 1:
            continue
        mname = wname.removesuffix(".weight")
        parent, _, leaf = mname.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        lin = getattr(owner, leaf)
        q, scales = int8_codes(qt)
        with warnings.catch_warnings():
            # torch deprecates its quantized tensors in favour of torchao, which is not in our stack;
            # the fbgemm/x86 kernels behind them are what dynamic int8 runs on.
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0)
            dq = DQLinear(lin.in_features, lin.out_features, bias_=lin.bias is not None, dtype=torch.qint8)
            dq.set_weight_bias(qw, lin.bias.data if lin.bias is not None else None)
        setattr(owner, leaf, dq)
