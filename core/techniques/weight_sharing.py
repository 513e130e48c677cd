"""Weight sharing: a k-means codebook per output channel (or per group of inputs); each weight
becomes an index into its row's codebook. The k-means is weighted by each input's calibration
energy (diag of the Hessian, as SqueezeLLM), and the GPTQ solver assigns the indices column by
column with error feedback; indices and fp16 codebooks are stored packed."""
from __future__ import annotations

from dataclasses import dataclass

from .base import StepContext, knob
from .gptq import (damping_knob, keep_zeros_of, layer_error, outlier_cols, outliers_knob, samples_knob, seq_len_knob,
                   sequential_knob, solve, text_knob)
from .registry import technique

ENTRIES = (4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class WeightSharing:
    """Weight sharing: k-means codebook per output channel (or group), weights stored as packed indices."""

    entries: int = knob(16, choices=ENTRIES, unit="entries",
                        help="Codebook size: 16 entries = 4-bit indices; fewer entries, smaller file, more error.")
    group_size: int = knob(0, choices=(0, 128, 256), labels={0: "per-channel"}, unit="weights",
                           help="Weights sharing one codebook along a row: the whole row, or groups of it.")
    error_feedback: bool = knob(True, help="Assign indices column by column, pushing each rounding error onto "
                                           "the columns still to come (GPTQ's update); off = plain nearest entry.")
    damping: float = damping_knob()
    outliers: int = outliers_knob(0)
    samples: int = samples_knob()
    seq_len: int = seq_len_knob()
    sequential: bool = sequential_knob()
    calib_text: str = text_knob()


def kmeans_rows(X, weight, k: int, iters: int = 15):
    """Weighted 1-D k-means of every row. X: (out, n), weight: (n,) -> centroids (out, k), fp16-exact."""
    import torch
    out, n = X.shape
    qs = torch.linspace(0, 1, k)
    C = torch.quantile(X, qs, dim=1).T.contiguous()  # (out, k): start at the row's quantiles
    w = weight.clamp(min=1e-12)[None, :, None]
    chunk = max(1, 2 ** 22 // (n * k))  # rows per step: (rows, n, k) stays ~16 MB
    for _ in range(iters):
        for r0 in range(0, out, chunk):
            x = X[r0:r0 + chunk]
            idx = (x[:, :, None] - C[r0:r0 + chunk, None, :]).abs().argmin(-1)       # (rows, n)
            onehot = torch.zeros(x.shape[0], n, k).scatter_(-1, idx[..., None], 1.0) * w
            mass = onehot.sum(1)                                                     # (rows, k)
            sums = (onehot * x[:, :, None]).sum(1)
            C[r0:r0 + chunk] = torch.where(mass > 0, sums / mass.clamp(min=1e-30), C[r0:r0 + chunk])
    return C.to(torch.float16).to(torch.float32)


class Codebook:
    """Quantizer for gptq.solve: a weighted k-means codebook per row of each group."""

    def __init__(self, k: int, importance):
        self.k, self.importance = k, importance  # importance: (in,) diag of H
        self.gs = None

    def fit(self, cur, g=0):
        lo = g * self.gs
        return kmeans_rows(cur, self.importance[lo:lo + cur.shape[1]], self.k)

    def quant(self, w, C):  # w: (out,), C: (out, k)
        import torch
        return C.gather(1, (w[:, None] - C).abs().argmin(1, keepdim=True)).squeeze(1)


@technique(WeightSharing, name="weight_sharing", family="quantization", packs=True)
def weight_sharing(model, cfg: WeightSharing, ctx: StepContext) -> dict:
    import math

    import torch

    from ..calibration import each_layer
    from ..packing import CodebookTensor

    bits = int(math.log2(cfg.entries))
    errs = {}

    def per_layer(i, lin, _st):
        for name, (m, st) in lin.items():
            ctx.check_cancel()
            W = m.weight.data
            H = st.hessian()
            out, inp = W.shape
            gs = inp if cfg.group_size <= 0 else min(cfg.group_size, inp)
            cols = outlier_cols(H, cfg.outliers)
            imp = H.diagonal().clone()
            if cols is not None:  # fp16 columns: no codebook entry is spent on them
                imp[cols] = 0.0
            cb = Codebook(cfg.entries, imp)
            cb.gs = gs
            if cfg.error_feedback:
                Q, books = solve(W, H, gs, cb, cfg.damping, act_order=True, keep_zeros=keep_zeros_of(W),
                                 keep_cols=cols)
            else:
                Wf = W.float()
                books = [cb.fit(Wf[:, g0:g0 + gs], g0 // gs) for g0 in range(0, inp, gs)]
                Q = torch.cat([torch.stack([cb.quant(c, books[g0 // gs]) for c in Wf[:, g0:g0 + gs].T], 1)
                               for g0 in range(0, inp, gs)], 1)
                if cols is not None:
                    Q[:, cols] = Wf[:, cols].half().float()
            C = torch.stack(books, 1)                                   # (out, G, k)
            grp = torch.arange(inp) // gs
            idx = torch.cat([(Q[r:r + 64, :, None] - C[r:r + 64][:, grp, :]).abs().argmin(-1)
                             for r in range(0, out, 64)])               # (out, in): exact matches
            ct = CodebookTensor.from_indices(idx, C, bits, gs)
            if cols is not None:
                ct.cols, ct.patch = cols.tolist(), Q[:, cols].half()
            deq = ct.dequantize()
            errs[name] = layer_error(W, deq, H)
            W.copy_(deq)
            ctx.packed[f"{name}.weight"] = ct

    each_layer(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text, per_layer, cfg.sequential)
    return {"layers": len(errs), "entries": cfg.entries, "output_error": sum(errs.values())}
