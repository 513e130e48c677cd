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


def bits_knob():
    return knob(4, min=2, max=8, step=1, unit="bits", help="Bits per weight.")


def group_knob():
    return knob(64, choices=GROUP_CHOICES, labels=GROUP_LABELS, unit="weights",
                help="Weights sharing one scale; smaller groups are more accurate and cost more scales.")


def symmetric_knob():
    return knob(True, help="Symmetric grid around zero (no zero-point).")


def samples_knob(default=64):
    return knob(default, choices=SAMPLE_CHOICES, unit="samples",
                help="Calibration samples (random windows of the calibration text); more = steadier statistics, slower.")


def seq_len_knob(default=512):
    return knob(default, choices=SEQ_CHOICES, unit="tokens", help="Tokens per calibration sample (BOS included).")


def sequential_knob(default=False):
    return knob(default, help="Calibrate each decoder layer on what the already-compressed layers before it "
                              "produce, so later layers correct earlier errors; slower, and not reused by a sweep.")


def damping_knob():
    return knob(0.01, min=0.001, max=1.0, step=0.001, unit="× mean diag", scale="log",
                help="Added to the Hessian's diagonal, as a fraction of its mean: stabilises the inverse.")


def outliers_knob(default):
    return knob(default, min=0, max=32, step=1, unit="columns",
                help="Input channels per Linear kept in fp16: those with the largest calibration "
                     "energy (massive activations); costs 2 bytes x rows each.")


def text_knob():
    return knob("", unit="file", help="Calibration text file; empty = the shipped WikiText-2 validation slice "
                         "(never the evaluation text).")


@dataclass(frozen=True)
class GPTQ:
    """GPTQ: second-order weight quantization with error feedback from calibration data, stored packed."""

    bits: int = bits_knob()
    group_size: int = group_knob()
    symmetric: bool = symmetric_knob()
    damping: float = damping_knob()
    act_order: bool = knob(True, help="Quantize the columns with the largest activations first "
                                      "(their error is then spread over the others).")
    outliers: int = outliers_knob(4)
    rotate: bool = knob(False, help="First rotate the residual stream by a fixed orthogonal matrix (same function, "
                                    "outlier channels spread out); two small products at run time.")
    awq_scaling: bool = knob(False, help="First scale input channels as AWQ does (searched on the same "
                                         "statistics, folded into the op before), then run GPTQ.")
    clip: bool = knob(True, help="Search each group's range (shrunk up to 45 %) for the least weighted "
                                 "rounding error, instead of always spanning the largest weight.")
    bos_weight: float = knob(1.0, min=0.0, max=1.0, step=0.05, unit="×",
                             help="Weight of the position-0 (BOS, attention-sink) tokens in the Hessian; "
                                  "1 = as they come.")
    upgrade_8bit: str = knob("", help="Linears given 8 bits instead (no fp16 columns), comma-separated name "
                                      "endings, e.g. mlp.down_proj for every layer's: with outliers 0, 4-bit "
                                      "quality that exports to faster ONNX than fp16 columns.")
    samples: int = samples_knob()
    seq_len: int = seq_len_knob()
    sequential: bool = sequential_knob()
    calib_text: str = text_knob()


class Grid:
    """Uniform grid per group of input columns (what packing.quantize stores).

    clip: each row's range is also tried shrunk (x 1.0 .. 0.55), keeping the one with the least
    squared error weighted by the input energy (the Hessian's diagonal) of the group's columns.
    """

    SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55)

    def __init__(self, bits: int, symmetric: bool, clip: bool = False, importance=None, group_size: int = 0):
        self.bits, self.symmetric, self.clip = bits, symmetric, clip
        self.importance, self.gs = importance, group_size

    def fit(self, cur, g=0):  # cur: (out, width) current values of group g
        import torch

        from ..packing import grid_params
        valid = torch.ones(1, 1, cur.shape[1], dtype=torch.bool)
        best, best_err = None, None
        imp = self.importance[g * self.gs:g * self.gs + cur.shape[1]] if self.importance is not None else 1.0
        for p in (self.SHRINK if self.clip else (1.0,)):
            s, z = grid_params((cur * p).unsqueeze(1), valid, self.bits, self.symmetric)
            params = (s[:, 0], z[:, 0] if z is not None else None)  # (out,), (out,) or None
            if not self.clip:
                return params
            wq = self.quant(cur, (params[0][:, None], None if params[1] is None else params[1][:, None]))
            err = ((cur - wq) ** 2 * imp).sum(1)  # (out,)
            if best is None:
                best, best_err = params, err
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = (torch.where(better, params[0], best[0]),
                        None if params[1] is None else torch.where(better, params[1], best[1]))
        return best

    def quant(self, w, params):  # w: (out,) with params (out,), or (out, k) with params (out, 1)
        import torch
        s, z = params
        if self.symmetric:
            half = 2 ** (self.bits - 1)
            return torch.clamp(torch.round(w / s), -half, half - 1) * s
        return (torch.clamp(torch.round(w / s) + z, 0, 2 ** self.bits - 1) - z) * s


def solve(W, H, group_size: int, quantizer, damping: float, act_order: bool, keep_zeros=None,
          keep_cols=None, block: int = 128):
    """GPTQ on one weight. W: (out, in), H: (in, in) -> (Q (out, in), per-group params list).

    Groups are contiguous runs of `group_size` input columns (partial last group allowed), so
    they can be stored as is even with act_order: a group's parameters are fitted on its
    current (error-updated) values when its first column comes up in the processing order.
    keep_zeros: (out, in) bool, weights that must stay exactly zero (an earlier pruning).
    keep_cols: input columns kept in fp16 (outliers): taken first, left out of the group fits
    and of the damping's mean.
    """
    import torch

    W = W.detach().float().clone()
    H = H.detach().float().clone()
    out, n = W.shape
    gs = n if group_size <= 0 else min(group_size, n)
    dead = H.diagonal() <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    key = H.diagonal().clone() if act_order else -torch.arange(n, dtype=torch.float32)
    kept = torch.zeros(n, dtype=torch.bool)
    if keep_cols is not None and len(keep_cols):
        kept[keep_cols] = True
        key[kept] = torch.inf  # exact columns first: the others absorb their (fp16) rounding
    perm = torch.argsort(key, descending=True, stable=True)
    inv = torch.argsort(perm)
    diag_rest = H.diagonal()[~kept] if (~kept).any() else H.diagonal()
    W, H = W[:, perm], H[perm][:, perm]
    kept = kept[perm]
    mask = keep_zeros[:, perm] if keep_zeros is not None else None
    H.diagonal().add_(damping * diag_rest.mean())
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
                cur[:, kept[pos]] = 0.0  # fp16 columns do not stretch the group's grid
                params[g] = quantizer.fit(cur, g)
            w = W1[:, i]
            q = w.half().float() if kept[i1 + i] else quantizer.quant(w, params[g])
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


def outlier_cols(H, k: int):
    """The k input channels with the largest energy (diag of H), or None."""
    import torch
    if k <= 0:
        return None
    return torch.topk(H.diagonal(), min(k, H.shape[0])).indices.sort().values


def keep_zeros_of(W):
    """The exact zeros an earlier pruning step left (None when there are hardly any)."""
    z = W == 0
    return z if z.float().mean() > 0.01 else None


@technique(GPTQ, name="gptq", family="quantization", packs=True)
def gptq(model, cfg: GPTQ, ctx: StepContext) -> dict:
    from ..calibration import each_layer
    from ..packing import OutlierQTensor, quantize

    key = ctx.state_key
    if cfg.rotate:
        from .base import target_linears
        from .rotation import rotate_model
        if any(keep_zeros_of(m.weight.data) is not None for _, m in target_linears(model)):
            ctx.log("gptq: not rotating: the weights are pruned and a rotation would fill their zeros")
        else:
            ctx.runtime.append(rotate_model(model))
            ctx.state_key = key + ":rotated" if key else key
    errs = {}

    from ..calibration import decoder_layers
    from .quantization import excluded
    layers = decoder_layers(model)
    eight = excluded(cfg.upgrade_8bit, model, "upgrade_8bit")

    def per_layer(i, lin, st_layer):
        awq_s = {}
        if cfg.awq_scaling:
            from .awq import scale_layer
            awq_s = scale_layer(layers[i], st_layer, cfg.bits, cfg.group_size, cfg.symmetric, 10)
        for name, (m, st) in lin.items():
            ctx.check_cancel()
            H = st.hessian(cfg.bos_weight)
            s = awq_s.get(name.split(f".{i}.", 1)[1])
            if s is not None:  # the input is now x / s
                H = H / s[:, None] / s[None, :]
            W = m.weight.data
            bits = 8 if eight and name.endswith(eight) else cfg.bits
            cols = outlier_cols(H, cfg.outliers if bits == cfg.bits else 0)
            gs = W.shape[1] if cfg.group_size <= 0 else min(cfg.group_size, W.shape[1])
            grid = Grid(bits, cfg.symmetric, cfg.clip, H.diagonal(), gs)
            Q, params = solve(W, H, cfg.group_size, grid, cfg.damping, cfg.act_order, keep_zeros_of(W), cols)
            scales = _stack([p[0] for p in params])
            zeros = None if cfg.symmetric else _stack([p[1] for p in params])
            qt = quantize(Q, bits, cfg.group_size, cfg.symmetric, scales=scales, zeros=zeros)
            if cols is not None:
                qt = OutlierQTensor.of(qt, cols.tolist(), Q[:, cols])
            deq = qt.dequantize()
            errs[name] = layer_error(W, deq, H)
            W.copy_(deq)
            ctx.packed[f"{name}.weight"] = qt

    try:
        each_layer(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text, per_layer, cfg.sequential)
    finally:
        ctx.state_key = key
    return {"layers": len(errs), "bits": cfg.bits, "group_size": cfg.group_size,
            "output_error": sum(errs.values())}


def _stack(cols):
    import torch
    return torch.stack(cols, dim=1)  # (out, G)
