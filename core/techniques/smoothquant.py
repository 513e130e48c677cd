"""SmoothQuant W8A8: move activation outliers into the weights (x / s, W * s with
s = max|x|^alpha / max|W|^(1 - alpha)), then int8 weights per output channel and int8
activations with one static per-tensor scale calibrated on the smoothed inputs.

Stored as int8 weights (packed) plus each Linear's activation scale; on load a runtime
transform makes each Linear quantize its input to int8 before the matmul (simulated: the
integer product equals the float product of the two int8 grids).

float_bos (PrefixQuant, Chen et al. 2024): the first position (BOS, the attention sink) carries
massive activations - 3,065 at one down_proj input of SmolLM2 against < 180 at every other
position - so a static range that holds them leaves every other token on a grid 17x too coarse.
That position's activations are the same for every text, so a deployment computes its KV cache
once in float (a fixed prefix) and int8 only ever sees the others; the ranges then come from
positions > 0. Simulated here by leaving position 0's rows unquantized.
"""
from __future__ import annotations

from dataclasses import dataclass

from .awq import fold, groups_of, tie_for
from .base import StepContext, knob
from .gptq import samples_knob, seq_len_knob, sequential_knob, text_knob
from .registry import technique


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant W8A8: migrate activation outliers into the weights, then int8 weights and static int8 activations."""

    alpha: float = knob(0.8, min=0.0, max=1.0, step=0.05, unit="",
                        help="Migration strength: 0 leaves the activations as they are, 1 moves all their range "
                             "into the weights.")
    act_percentile: float = knob(1.0, min=0.9, max=1.0, step=0.001, unit="fraction",
                                 help="Static activation range: the maximum seen in calibration (1) or a clip "
                                      "below it, as a fraction of that maximum.")
    samples: int = samples_knob()
    seq_len: int = seq_len_knob()
    float_bos: bool = knob(True, help="Run the first position (BOS, the attention sink) in float, as a fixed "
                                      "prefix whose cache is computed once: its massive activations then leave "
                                      "the static int8 ranges (PrefixQuant).")
    sequential: bool = sequential_knob()
    calib_text: str = text_knob()


def act_range(stat, float_bos: bool):
    """(in,) max |x| per input channel over the positions int8 will see."""
    import torch
    return stat.absmax if float_bos else torch.maximum(stat.absmax, stat.x0.abs().amax(0))


def smooth_layer(layer, st: dict, alpha: float, float_bos: bool = False) -> dict:
    """Smooths one decoder layer in place. -> {linear short name: s (in,)} (inputs are now x / s)."""
    import torch
    mods = dict(layer.named_modules())
    scales = {}
    for group in groups_of(layer):
        names = group["linears"]
        stat = st[names[0]]
        xmax = act_range(stat, float_bos).clamp(min=1e-5)
        wmax = torch.stack([mods[n].weight.data.abs().amax(0) for n in names]).amax(0).clamp(min=1e-5)
        tie = tie_for(group, layer, xmax.numel())
        if tie is not None:  # one scale per v_proj row: pool over the query heads that share it
            n = int(tie.max()) + 1
            xmax = torch.zeros(n).scatter_reduce(0, tie, xmax, "amax", include_self=False)[tie]
            wmax = torch.zeros(n).scatter_reduce(0, tie, wmax, "amax", include_self=False)[tie]
        s = (xmax ** alpha / wmax ** (1 - alpha)).clamp(min=1e-5)
        fold(group, layer, s, tie)
        with torch.no_grad():
            for n_ in names:
                mods[n_].weight.mul_(s[None, :])
                scales[n_] = s
    return scales


@technique(SmoothQuant, name="smoothquant", family="quantization", packs=True)
def smoothquant(model, cfg: SmoothQuant, ctx: StepContext) -> dict:
    import torch

    from ..calibration import decoder_layers, each_layer
    from ..packing import ActQTensor, quantize

    layers = decoder_layers(model)
    ranges = {}

    def per_layer(i, lin, st):
        scales = smooth_layer(layers[i], st, cfg.alpha, cfg.float_bos)
        for name, (m, stat) in lin.items():
            s = scales[name.split(f".{i}.", 1)[1]]
            amax = float(act_range(stat, cfg.float_bos).div(s).max()) * cfg.act_percentile
            qt = quantize(m.weight.data, 8, 0, True)
            aq = ActQTensor(qt.shape, qt.bits, qt.group_size, qt.symmetric, qt.codes, qt.scales, qt.zeros)
            aq.act_scale, aq.float_first = max(amax, 1e-8) / 127, cfg.float_bos
            m.weight.data.copy_(aq.dequantize())
            ctx.packed[f"{name}.weight"] = aq
            ranges[name] = amax

    each_layer(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text, per_layer, cfg.sequential)
    ctx.runtime.append("w8a8")
    return {"layers": len(ranges), "alpha": cfg.alpha, "max_act_range": max(ranges.values(), default=0.0),
            "float_bos": cfg.float_bos}


class W8A8Linear:
    """Marker base; the module is built by `to_w8a8`."""


def to_w8a8(model, packed: dict) -> None:
    """Runtime transform: each W8A8 Linear quantizes its input to int8 with its static scale (except,
    for float_bos variants, at position 0)."""
    import torch

    from ..packing import ActQTensor

    state: dict = {}  # "first": (B, T) bool, which rows of this forward are position 0

    class _W8A8(torch.nn.Linear, W8A8Linear):
        def forward(self, x):
            a = self.act_scale
            xq = torch.clamp(torch.round(x / a), -127, 127) * a
            first = state.get("first") if self.float_first else None
            if first is not None and x.dim() == 3 and first.shape[-1] == x.shape[1]:
                xq = torch.where(first[..., None], x, xq)  # traceable: the mask comes from position_ids
            return torch.nn.functional.linear(xq, self.weight, self.bias)

    prefix = False
    for wname, qt in packed.items():
        if not isinstance(qt, ActQTensor):
            continue
        mname = wname.removesuffix(".weight")
        parent, _, leaf = mname.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        lin = getattr(owner, leaf)
        lin.__class__ = _W8A8
        lin.act_scale, lin.float_first = qt.act_scale, qt.float_first
        prefix |= qt.float_first
    if prefix:
        model.register_forward_pre_hook(lambda m, args, kwargs: state.update(first=_positions(args, kwargs) == 0),
                                        with_kwargs=True)


def _positions(args, kwargs):
    """(B or 1, T) positions of this forward's tokens, from what a causal LM's forward is given."""
    import torch
    pos = kwargs.get("position_ids")
    if pos is not None:
        return pos
    if kwargs.get("cache_position") is not None:
        return kwargs["cache_position"][None, :]
    ids = kwargs.get("input_ids", args[0] if args else None)
    t = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
    past = kwargs.get("past_key_values")
    start = past.get_seq_length() if hasattr(past, "get_seq_length") else 0
    return torch.arange(start, start + t)[None, :]
