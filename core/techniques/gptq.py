"""GPTQ: quantize a Linear column by column, pushing each column's rounding error onto the
columns not yet quantized through the inverse Hessian of its calibration inputs.

The same solver serves weight sharing (a codebook instead of a uniform grid) and keeps the
zeros of an earlier pruning step (mask-aware), so `sparsegpt -> gptq` stays sparse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .base import StepContext, knob
from .quantization import GROUP_CHOICES, GROUP_LABELS
from .registry import technique

SAMPLE_CHOICES = (8, 16, 32, 64, 128, 256)
SEQ_CHOICES = (128, 256, 512, 1024, 2048)


def samples_knob(default=64):
    return knob(default, choices=SAMPLE_CHOICES, unit="samples",
                help="Calibration samples (random windows of the calibration text); more = steadier statistics, slower.")


def seq_len_knob(default=512):
    return knob(default, choices=SEQ_CHOICES, unit="tokens", help="Tokens per calibration sample (BOS included).")


def text_knob():
    return knob("", help="Calibration text file; empty = the shipped WikiText-2 validation slice "
                         "(never the evaluation text).")


@dataclass(frozen=True)
class GPTQ:
    """GPTQ: second-order weight quantization with error feedback from calibration data, stored packed."""

    bits: int = knob(4, min=2, max=8, step=1, unit="bits", help="Bits per weight.")
    group_size: int = knob(64, choices=GROUP_CHOICES, labels=GROUP_LABELS, unit="weights",
                           help="Weights sharing one scale; smaller groups are more accurate and cost more scales.")
    symmetric: bool = knob(True, help="Symmetric grid around zero (no zero-point).")
    damping: float = knob(0.01, min=0.0001, max=1.0, step=0.01, unit="x mean diag",
                          help="Added to the Hessian's diagonal, as a fraction of its mean: stabilises the inverse.")
    act_order: bool = knob(True, help="Quantize the columns with the largest activations first "
                                      "(their error is then spread over the others).")
    bos_weight: float = knob(1.0, min=0.0, max=1.0, step=0.05, unit="x",
                             help="Weight of the position-0 (BOS, attention-sink) tokens in the Hessian; "
                                  "1 = as they come.")
    samples: int = samples_knob()
    seq_len: int = seq_len_knob()
    calib_text: str = text_knob()


class Grid:
    """Uniform grid per group of input columns (what packing.quantize stores)."""

    def __init__(self, bits: int, symmetric: bool):
        self.bits, self.symmetric = bits, symmetric

    def fit(self, cur):  # cur: (out, width) current values of one group
        import torch

        from ..packing import grid_params
        s, z = grid_params(cur.unsqueeze(1), torch.ones(1, 1, cur.shape[1], dtype=torch.bool),
                           self.bits, self.symmetric)
        return s[:, 0], (z[:, 0] if z is not None else None)  # (out,), (out,) or None

    def quant(self, w, params):  # w: (out,)
        import torch
        s, z = params
        if self.symmetric:
            half = 2 ** (self.bits - 1)
            return torch.clamp(torch.round(w / s), -half, half - 1) * s
        return (torch.clamp(torch.round(w / s) + z, 0, 2 ** self.bits - 1) - z) * s


def solve(W, H, group_size: int, quantizer, damping: float, act_order: bool, keep_zeros=None,
          block: int = 128):
    """GPTQ on one weight. W: (out, in), H: (in, in) -> (Q (out, in), per-group params list).

    Groups are contiguous runs of `group_size` input columns (partial last group allowed), so
    they can be stored as is even with act_order: a group's parameters are fitted on its
    current (error-updated) values when its first column comes up in the processing order.
    keep_zeros: (out, in) bool, weights that must stay exactly zero (an earlier pruning).
    """
    import torch

    W = W.detach().float().clone()
    H = H.detach().float().clone()
    out, n = W.shape
    gs = n if group_size <= 0 else min(group_size, n)
    dead = H.diagonal() <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(n)
    inv = torch.argsort(perm)
    W, H = W[:, perm], H[perm][:, perm]
    mask = keep_zeros[:, perm] if keep_zeros is not None else None
    H.diagonal().add_(damping * H.diagonal().mean())
    Hinv = _inverse_cholesky(H)  # upper: Hinv[i, i:] spreads column i's error
    Q = torch.zeros_like(W)
    params = [None] * math.ceil(n / gs)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, E1 = W[:, i1:i2].clone(), torch.zeros(out, i2 - i1)
        Hb = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = int(perm[i1 + i]) // gs
            if params[g] is None:
                pos = inv[g * gs:min((g + 1) * gs, n)]  # where the group's columns sit now
                cur = W[:, pos].clone()
                inb = (pos >= i1) & (pos < i2)
                cur[:, inb] = W1[:, pos[inb] - i1]
                after = pos >= i2
                if after.any() and i:
                    cur[:, after] -= E1[:, :i] @ Hinv[i1:i1 + i][:, pos[after]]
                if mask is not None:
                    cur[mask[:, pos]] = 0.0
                params[g] = quantizer.fit(cur)
            w = W1[:, i]
            q = quantizer.quant(w, params[g])
            if mask is not None:
                q[mask[:, i1 + i]] = 0.0
            Q[:, i1 + i] = q
            err = (w - q) / Hb[i, i]
            W1[:, i:] -= err[:, None] * Hb[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return Q[:, inv], params


def _inverse_cholesky(H):
    import torch
    for extra in (0.0, 1e-6, 1e-4, 1e-2, 1e-1):  # near-singular Hessians: a little more damping
        try:
            Hd = H + extra * H.diagonal().mean() * torch.eye(H.shape[0]) if extra else H
            L = torch.linalg.cholesky(Hd)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except RuntimeError:
            continue
    raise RuntimeError("the calibration Hessian is not positive definite even with damping")


def layer_error(W, Q, H) -> float:
    """Output error on the calibration inputs: mean over tokens of ||(W - Q) x||^2 = tr(D H D^T)."""
    D = (W - Q).detach().float()
    return float(((D @ H) * D).sum())


def for_each_layer(model, ctx: StepContext, stats, fn, share: float) -> None:
    """Calls fn(i, {full linear name: (module, Stat)}) for each decoder layer, with progress and cancel."""
    import torch

    from ..calibration import decoder_layers
    layers = decoder_layers(model)
    prefix = _layers_prefix(model)
    for i, layer in enumerate(layers):
        ctx.check_cancel()
        st = stats.layer(i)
        lin = {f"{prefix}.{i}.{n}": (m, st[n]) for n, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear) and n in st}
        fn(i, lin)
        ctx.progress(share + (1 - share) * (i + 1) / len(layers), f"layer {i + 1}/{len(layers)}")


def _layers_prefix(model) -> str:
    from ..calibration import decoder_layers
    layers = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers)


def keep_zeros_of(W):
    """The exact zeros an earlier pruning step left (None when there are hardly any)."""
    z = W == 0
    return z if z.float().mean() > 0.01 else None


@technique(GPTQ, name="gptq", family="quantization", packs=True)
def gptq(model, cfg: GPTQ, ctx: StepContext) -> dict:
    from ..calibration import calibrate
    from ..packing import quantize

    stats = calibrate(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text)
    grid = Grid(cfg.bits, cfg.symmetric)
    errs = {}

    def per_layer(i, lin):
        for name, (m, st) in lin.items():
            ctx.check_cancel()
            H = st.hessian(cfg.bos_weight)
            W = m.weight.data
            Q, params = solve(W, H, cfg.group_size, grid, cfg.damping, cfg.act_order, keep_zeros_of(W))
            scales = _stack([p[0] for p in params])
            zeros = None if cfg.symmetric else _stack([p[1] for p in params])
            qt = quantize(Q, cfg.bits, cfg.group_size, cfg.symmetric, scales=scales, zeros=zeros)
            deq = qt.dequantize()
            errs[name] = layer_error(W, deq, st.hessian())
            W.copy_(deq)
            ctx.packed[f"{name}.weight"] = qt

    for_each_layer(model, ctx, stats, per_layer, share=0.5)
    return {"layers": len(errs), "bits": cfg.bits, "group_size": cfg.group_size,
            "output_error": sum(errs.values())}


def _stack(cols):
    import torch
    return torch.stack(cols, dim=1)  # (out, G)
