"""AWQ: scale each Linear's input channels by s = mean|x|^alpha (alpha searched per layer
group), fold 1/s into the operation before (RMSNorm weight, v_proj or up_proj rows), then
quantize with a clipping search; all errors measured on the calibration Hessian.

The scaling leaves the float model's function unchanged; only the rounding sees salient
channels on a finer grid.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import StepContext, knob
from .gptq import (bits_knob, group_knob, layer_error, outlier_cols, outliers_knob, samples_knob, seq_len_knob,
                   sequential_knob, symmetric_knob, text_knob)
from .registry import technique


@dataclass(frozen=True)
class AWQ:
    """AWQ: activation-aware per-channel scaling searched on calibration data, then grouped quantization, stored packed."""

    bits: int = bits_knob()
    group_size: int = group_knob()
    symmetric: bool = symmetric_knob()
    grid: int = knob(20, min=1, max=40, step=1, unit="points",
                     help="Scaling exponents tried between 0 and 1 (more = finer search, slower).")
    clip: bool = knob(True, help="Also search a clipping ratio per group (shrinks the grid's range when "
                                 "that lowers the output error).")
    refit: bool = knob(True, help="Then refit each row's group scales by least squares on the calibration "
                                  "inputs (the codes re-rounded to the new scales, twice): same 4-bit grid, "
                                  "lower output error.")
    outliers: int = outliers_knob(0)
    outlier_allocation: str = knob("loss", choices=("loss", "uniform"),
                                   help="uniform: every Linear keeps `outliers` fp16 columns, its highest-energy "
                                        "inputs. loss: the same number of fp16 values in all, spent model-wide on "
                                        "the columns whose 4-bit rounding costs most loss (error x input energy x "
                                        "squared loss gradient at each output).")
    samples: int = samples_knob()
    seq_len: int = seq_len_knob()
    sequential: bool = sequential_knob()
    calib_text: str = text_knob()

    @property
    def uses_loss_gradients(self) -> bool:  # the loss-allocated fp16 columns take a backward pass
        return self.outliers > 0 and self.outlier_allocation == "loss"


def fake_quant(W, bits: int, group_size: int, symmetric: bool, shrink=None):
    """Round-to-nearest on the stored grid (fp16 scales), optionally with clipping. W: (out, in).
    shrink: None, a number, or (out, G) per-group ratios applied to the range."""
    import torch

    from ..packing import grid_params, group_shape
    out, inp = W.shape
    gs, G, pad = group_shape(inp, group_size)
    wg = torch.nn.functional.pad(W, (0, pad)).view(out, G, gs)
    valid = (torch.arange(G * gs) < inp).view(1, G, gs)
    if shrink is not None:
        r = shrink if not torch.is_tensor(shrink) else shrink.unsqueeze(-1)
        lo = torch.where(valid, wg, torch.full((), torch.inf)).amin(-1, keepdim=True).clamp(max=0) * r
        hi = torch.where(valid, wg, torch.full((), -torch.inf)).amax(-1, keepdim=True).clamp(min=0) * r
        wg = torch.minimum(torch.maximum(wg, lo), hi)
    s, z = grid_params(wg, valid, bits, symmetric)
    s = s.unsqueeze(-1)
    if symmetric:
        half = 2 ** (bits - 1)
        q = torch.clamp(torch.round(wg / s), -half, half - 1) * s
    else:
        z = z.unsqueeze(-1)
        q = (torch.clamp(torch.round(wg / s) + z, 0, 2 ** bits - 1) - z) * s
    return q.reshape(out, G * gs)[:, :inp], s.squeeze(-1), (z.squeeze(-1) if z is not None else None)


def clip_search(W, H, bits, group_size, symmetric, steps: int = 10, lowest: float = 0.6):
    """(out, G) clipping ratios minimising each group's output error on the block-diagonal of H."""
    import torch

    from ..packing import group_shape
    out, inp = W.shape
    gs, G, pad = group_shape(inp, group_size)
    Hp = torch.nn.functional.pad(H, (0, pad, 0, pad))
    Hg = torch.stack([Hp[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(G)])  # (G, gs, gs)
    best, best_r = torch.full((out, G), torch.inf), torch.ones(out, G)
    for k in range(steps + 1):
        r = 1.0 - (1.0 - lowest) * k / steps
        q, _, _ = fake_quant(W, bits, group_size, symmetric, r)
        D = torch.nn.functional.pad(W - q, (0, pad)).view(out, G, gs)
        err = torch.einsum("ogi,gij,ogj->og", D, Hg, D)
        better = err < best
        best = torch.where(better, err, best)
        best_r = torch.where(better, torch.full((), r), best_r)
    return best_r


def refit_scales(W, q, sc, H, bits: int, group_size: int, rounds: int = 2):
    """Symmetric grids only. Given RTN codes n = q / sc, the per-group scales s (out, G) that
    minimise each row's output error (W_r - sum_g s_g n_rg) H (...)^T solve a G x G system per row;
    the codes are then re-rounded to the new scales and the fit repeated. A row keeps whichever
    of its fits (or the original) has the lowest error. -> (q, sc) with sc fp16-exact."""
    import torch

    from ..packing import group_shape
    out, inp = W.shape
    gs, G, pad = group_shape(inp, group_size)
    Wp = torch.nn.functional.pad(W.float(), (0, pad))                        # (out, G*gs)
    Hp = torch.nn.functional.pad(H.float(), (0, pad, 0, pad))
    WH = Wp @ Hp
    half = 2 ** (bits - 1)

    def row_err(Q):
        D = Wp - Q
        return ((D @ Hp) * D).sum(-1)                                          # (out,)

    def expand(s):
        return s.repeat_interleave(gs, dim=1)                                  # (out, G*gs)

    s = sc.float()
    Q = torch.nn.functional.pad(q.float(), (0, pad))
    best_q, best_s, best = Q, s, row_err(Q)
    ridge = 1e-6 * Hp.diagonal().mean().clamp(min=1e-12)
    for _ in range(rounds):
        N = torch.where(expand(s) > 0, Q / expand(s).clamp(min=1e-30), torch.zeros(()))  # integer codes
        A = torch.stack([((N[:, g * gs:(g + 1) * gs] @ Hp[g * gs:(g + 1) * gs]) * N).view(out, G, gs).sum(-1)
                         for g in range(G)], dim=1)                            # (out, G, G)
        b = (N * WH).view(out, G, gs).sum(-1)                                  # (out, G)
        A = A + ridge * torch.eye(G)
        s_new = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
        s_new = torch.where(s_new > 0.25 * s, s_new, s).half().float()        # stored as fp16
        Q = torch.clamp(torch.round(Wp / expand(s_new).clamp(min=1e-30)), -half, half - 1) * expand(s_new)
        s = s_new
        err = row_err(Q)
        better = err < best
        best = torch.where(better, err, best)
        best_q = torch.where(better[:, None], Q, best_q)
        best_s = torch.where(better[:, None], s, best_s)
    return best_q[:, :inp], best_s


def groups_of(layer) -> list[dict]:
    """The Llama layer's scalable groups: Linears sharing one input, and the op before them
    that absorbs 1/s. kind: 'norm' (RMSNorm weight), 'rows' (output rows of a Linear)."""
    a, m = layer.self_attn, layer.mlp
    return [
        {"prev": layer.input_layernorm, "kind": "norm", "linears": ["self_attn.q_proj", "self_attn.k_proj",
                                                                      "self_attn.v_proj"]},
        {"prev": a.v_proj, "kind": "rows", "linears": ["self_attn.o_proj"]},
        {"prev": layer.post_attention_layernorm, "kind": "norm", "linears": ["mlp.gate_proj", "mlp.up_proj"]},
        {"prev": m.up_proj, "kind": "rows", "linears": ["mlp.down_proj"]},
    ]


def tie_for(group, layer, n_in: int):
    """Index map in -> prev's output channel: o_proj's inputs repeat v_proj's rows per query head
    group (GQA), so their scales must be equal within each map class."""
    import torch
    prev = group["prev"]
    if group["kind"] == "rows" and getattr(prev, "out_features", n_in) != n_in:
        cfg = layer.self_attn.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        j = torch.arange(n_in)
        return (j // hd) // rep * hd + j % hd
    return None


def search_scales(Ws: list, H, absmean, bits, group_size, symmetric, grid: int, tie=None, keep=None):
    """Best s (in,) for Linears sharing an input: s = absmean^alpha, alpha on the grid, error on H.
    keep: input columns that stay fp16 (exact, and left out of the groups' ranges)."""
    import torch
    base = absmean.clamp(min=1e-5)
    if tie is not None:  # one scale per prev channel: the mean of the channels it feeds
        n = int(tie.max()) + 1
        pooled = torch.zeros(n).index_add_(0, tie, base) / torch.bincount(tie, minlength=n).clamp(min=1)
        base = pooled[tie]
    best, best_s = None, torch.ones_like(base)
    for k in range(grid + 1):
        alpha = k / max(grid, 1)
        s = base ** alpha
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for W in Ws:
            Wq = W * s[None, :]
            if keep is not None:
                Wq[:, keep] = 0.0
            q, _, _ = fake_quant(Wq, bits, group_size, symmetric)
            q = q / s[None, :]
            if keep is not None:
                q[:, keep] = W[:, keep]
            err += layer_error(W, q, H)
        if best is None or err < best:
            best, best_s = err, s
    return best_s


def fold(group, layer, s, tie) -> None:
    """Divide the op before by s (the group's Linears are multiplied by s by the caller)."""
    import torch
    prev = group["prev"]
    with torch.no_grad():
        if group["kind"] == "norm":
            prev.weight.div_(s)
        else:
            sv = s if tie is None else torch.zeros(prev.out_features).index_copy_(0, tie, s)
            prev.weight.div_(sv[:, None])
            if prev.bias is not None:
                prev.bias.div_(sv)


def scale_layer(layer, st: dict, bits, group_size, symmetric, grid, outliers: int = 0, cols_for=None) -> dict:
    """AWQ-scales one decoder layer in place. -> {linear short name: s (in,)} (inputs are now x / s).
    outliers: the searched error treats that many highest-energy input columns as kept in fp16
    (cols_for: {first Linear of a group: its fp16 columns} instead, when given)."""
    import torch
    mods = dict(layer.named_modules())
    scales = {}
    for group in groups_of(layer):
        names = group["linears"]
        stat = st[names[0]]
        Ws = [mods[n].weight.data for n in names]
        tie = tie_for(group, layer, Ws[0].shape[1])
        H = stat.hessian()
        cols = cols_for.get(names[0]) if cols_for is not None else outlier_cols(H, outliers)
        s = search_scales(Ws, H, stat.absmean, bits, group_size, symmetric, grid, tie, cols)
        fold(group, layer, s, tie)
        with torch.no_grad():
            for n in names:
                mods[n].weight.mul_(s[None, :])
                scales[n] = s
    return scales


@technique(AWQ, name="awq", family="quantization", packs=True)
def awq(model, cfg: AWQ, ctx: StepContext) -> dict:
    from ..calibration import decoder_layers, each_layer
    from ..packing import OutlierQTensor, quantize

    layers = decoder_layers(model)
    errs = {}
    plan = outlier_plan(model, ctx, cfg) if cfg.uses_loss_gradients else None

    def per_layer(i, lin, st):
        cols_for = None if plan is None else plan[i]
        scales = scale_layer(layers[i], st, cfg.bits, cfg.group_size, cfg.symmetric, cfg.grid, cfg.outliers,
                             cols_for)
        first = {n: g["linears"][0] for g in groups_of(layers[i]) for n in g["linears"]}
        for name, (m, stat) in lin.items():
            ctx.check_cancel()
            short = name.split(f".{i}.", 1)[1]
            s = scales[short]
            H0 = stat.hessian()
            H = H0 / s[:, None] / s[None, :]  # the Hessian of the scaled input x / s
            W = m.weight.data
            # as the scale search assumed
            cols = outlier_cols(H0, cfg.outliers) if cols_for is None else cols_for.get(first[short])
            Wg = W.clone()
            if cols is not None:  # fp16 columns do not stretch their groups' grids
                Wg[:, cols] = 0.0
            shrink = clip_search(Wg, H, cfg.bits, cfg.group_size, cfg.symmetric) if cfg.clip else None
            q, sc, z = fake_quant(Wg, cfg.bits, cfg.group_size, cfg.symmetric, shrink)
            if cfg.refit and cfg.symmetric:
                q, sc = refit_scales(Wg, q, sc, H, cfg.bits, cfg.group_size)
            qt = quantize(q, cfg.bits, cfg.group_size, cfg.symmetric, scales=sc, zeros=z)
            if cols is not None:
                qt = OutlierQTensor.of(qt, cols.tolist(), W[:, cols])
            deq = qt.dequantize()
            errs[name] = layer_error(W, deq, H)
            W.copy_(deq)
            ctx.packed[f"{name}.weight"] = qt

    each_layer(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text, per_layer, cfg.sequential)
    info = {"layers": len(errs), "bits": cfg.bits, "group_size": cfg.group_size, "output_error": sum(errs.values())}
    if plan is not None:
        counts = [0 if c is None else len(c) for p in plan for c in p.values()]
        info["outlier_columns"] = [min(counts), sorted(counts)[len(counts) // 2], max(counts)]  # per group
    return info


def outlier_plan(model, ctx: StepContext, cfg) -> list[dict]:
    """[per layer: {first Linear of a group: sorted fp16 columns or None}]. The budget is the fp16
    values of `outliers` columns in every Linear; a column of a group costs the group's output rows
    and is worth sum over its Linears of sum_k g2_k (W - RTN(W))_kj^2 * E[x_j^2] (the loss its 4-bit
    rounding costs, to second order); the columns worth most per value are kept, model-wide."""
    import torch

    from .. import calibration

    g2 = calibration.grad_moments(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text)
    stats = calibration.calibrate(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text, share=0.3)
    layers = calibration.decoder_layers(model)
    prefix = calibration.layers_prefix(model, layers)
    cand, budget = [], 0
    for i, layer in enumerate(layers):
        st, mods = stats.layer(i), dict(layer.named_modules())
        for group in groups_of(layer):
            names = group["linears"]
            energy = st[names[0]].hessian().diagonal()           # (in,) E[x_j^2]
            worth = torch.zeros_like(energy)
            rows = 0
            for n in names:
                w = mods[n].weight.data.float()
                q, _, _ = fake_quant(w, cfg.bits, cfg.group_size, cfg.symmetric)
                worth += (g2[f"{prefix}.{i}.{n}"][:, None] * (w - q) ** 2).sum(0)
                rows += w.shape[0]
            worth *= energy
            budget += cfg.outliers * rows
            cand += [(float(v) / rows, i, names[0], j, rows) for j, v in enumerate(worth)]
    cand.sort(key=lambda t: -t[0])
    chosen: list[dict] = [{g["linears"][0]: [] for g in groups_of(layer)} for layer in layers]
    for _, i, first, j, rows in cand:
        if rows <= budget:
            chosen[i][first].append(j)
            budget -= rows
    return [{k: (torch.tensor(sorted(v)) if v else None) for k, v in layer.items()} for layer in chosen]
