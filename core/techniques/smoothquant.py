"""SmoothQuant W8A8: move activation outliers into the weights (x / s, W * s with
s = max|x|^alpha / max|W|^(1 - alpha)), then int8 weights per output channel and int8
activations with one static per-tensor scale calibrated on the smoothed inputs.

Stored as int8 weights (packed) plus each Linear's activation scale; on load a runtime
transform makes each Linear quantize its input to int8 before the matmul (simulated: the
integer product equals the float product of the two int8 grids).
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
    float_inputs: int = knob(0, min=0, max=64, step=1, unit="Linears",
                             help="Fallback: this many Linears keep float inputs (their weights stay int8), "
                                  "those whose static int8 input grid costs the most loss on the calibration "
                                  "text (its rounding noise weighted by the loss gradient at their output).")
    samples: int = samples_knob()
    seq_len: int = seq_len_knob()
    sequential: bool = sequential_knob()
    calib_text: str = text_knob()

    @property
    def uses_loss_gradients(self) -> bool:  # the fallback's ranking takes a backward pass
        return self.float_inputs > 0


def smooth_layer(layer, st: dict, alpha: float) -> dict:
    """Smooths one decoder layer in place. -> {linear short name: s (in,)} (inputs are now x / s)."""
    import torch
    mods = dict(layer.named_modules())
    scales = {}
    for group in groups_of(layer):
        names = group["linears"]
        stat = st[names[0]]
        xmax = torch.maximum(stat.absmax, stat.x0.abs().amax(0)).clamp(min=1e-5)
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

    from ..calibration import decoder_layers, each_layer, grad_moments
    from ..packing import ActQTensor, QTensor, quantize

    layers = decoder_layers(model)
    ranges, noise = {}, {}
    g2 = grad_moments(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text) if cfg.uses_loss_gradients else {}

    def per_layer(i, lin, st):
        scales = smooth_layer(layers[i], st, cfg.alpha)
        for name, (m, stat) in lin.items():
            s = scales[name.split(f".{i}.", 1)[1]]
            amax = float(torch.maximum(stat.absmax, stat.x0.abs().amax(0)).div(s).max()) * cfg.act_percentile
            qt = quantize(m.weight.data, 8, 0, True)
            aq = ActQTensor(qt.shape, qt.bits, qt.group_size, qt.symmetric, qt.codes, qt.scales, qt.zeros)
            aq.act_scale = max(amax, 1e-8) / 127
            m.weight.data.copy_(aq.dequantize())
            ctx.packed[f"{name}.weight"] = aq
            ranges[name] = amax
            if cfg.float_inputs:
                noise[name] = float(g2[name] @ output_noise(m.weight.data, aq.act_scale))

    each_layer(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text, per_layer, cfg.sequential)
    kept = sorted(noise, key=noise.get, reverse=True)[:cfg.float_inputs]
    for name in kept:  # weight-only int8 (a plain QTensor): no activation grid at run time
        aq = ctx.packed[f"{name}.weight"]
        ctx.packed[f"{name}.weight"] = QTensor(aq.shape, aq.bits, aq.group_size, aq.symmetric, aq.codes,
                                               aq.scales, aq.zeros)
    ctx.runtime.append("w8a8")
    info = {"layers": len(ranges), "alpha": cfg.alpha, "max_act_range": max(ranges.values(), default=0.0)}
    if kept:
        info["float_inputs"] = kept
        ctx.log(f"smoothquant: float inputs (weights int8) for {len(kept)} Linears: " + ", ".join(kept))
    return info


def output_noise(w, act_scale: float):
    """(out,) variance that a static int8 input grid of step act_scale adds to each output of y = W x:
    rounding noise of variance step^2 / 12 per input element, independent across inputs. Weighted by
    calibration.grad_moments it is the second-order estimate of the loss the grid costs."""
    return act_scale ** 2 / 12 * (w.float() ** 2).sum(1)


class W8A8Linear:
    """Marker base; the module is built by `to_w8a8`."""


def to_w8a8(model, packed: dict) -> None:
    """Runtime transform: each W8A8 Linear quantizes its input to int8 with its static scale."""
    import torch

    from ..packing import ActQTensor

    class _W8A8(torch.nn.Linear, W8A8Linear):
        def forward(self, x):
            a = self.act_scale
            xq = torch.clamp(torch.round(x / a), -127, 127) * a
            return torch.nn.functional.linear(xq, self.weight, self.bias)

    for wname, qt in packed.items():
        if not isinstance(qt, ActQTensor):
            continue
        mname = wname.removesuffix(".weight")
        parent, _, leaf = mname.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        lin = getattr(owner, leaf)
        lin.__class__ = _W8A8
        lin.act_scale = qt.act_scale
