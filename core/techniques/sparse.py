"""Calibrated pruning: Wanda (|W| x input norm) and SparseGPT (second-order, with weight
update), unstructured or N:M. N:M weights are stored compactly (kept values + positions)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from .base import StepContext, knob
from .gptq import _inverse_cholesky, damping_knob, layer_error, samples_knob, seq_len_knob, sequential_knob, text_knob
from .registry import technique

PATTERNS = ("unstructured", "2:4", "4:8")
PATTERN_HELP = ("Unstructured: any weights; N:M: N of every M consecutive weights of a row are zero "
                "(50 %; the sparsity slider is then ignored), stored as values + small positions.")


def nm(pattern: str) -> tuple[int, int] | None:
    """'2:4' -> (2 zeros, 4) per run; None for unstructured."""
    if pattern == "unstructured":
        return None
    n, m = pattern.split(":")
    return int(n), int(m)


def sparsity_knob():
    return knob(0.5, min=0.0, max=0.95, step=0.05, unit="fraction",
                help="Fraction of the decoder Linears' weights set to zero (unstructured pattern): in every "
                     "Linear, or on average over them with nonuniform.")


def nonuniform_knob():
    return knob(0.5, min=0.0, max=1.0, step=0.05, unit="",
                help="Unstructured only: how far each Linear's sparsity moves from the slider's value toward a "
                     "loss-based one (the model-wide ranking of |W| x input norm weighted by the loss gradient at "
                     "each output; sparsegpt also weighs each row's share by that gradient). 0: the same sparsity "
                     "in every Linear. The overall sparsity stays as set.")


def reconstruct_knob():
    return knob(0, min=0, max=32, step=1, unit="epochs",
                help="After the masks are chosen, train each decoder layer's kept weights (the zeros stay zero) "
                     "so its output on the calibration windows reaches the unpruned model's at that depth: this "
                     "many passes per layer; 0 = off. Needs a copy of the model in memory and costs minutes.")


class _Nonuniform:
    """Wanda's and SparseGPT's shared rule for when the nonuniform plan (and its backward pass) runs."""

    @property
    def uses_loss_gradients(self) -> bool:
        return nm(self.pattern) is None and self.nonuniform > 0 and 0 < self.sparsity < 1


@dataclass(frozen=True)
class Wanda(_Nonuniform):
    """Wanda: prune the weights with the smallest |W| x input-activation norm, per output row."""

    sparsity: float = sparsity_knob()
    pattern: str = knob("unstructured", choices=PATTERNS, help=PATTERN_HELP)
    nonuniform: float = nonuniform_knob()
    samples: int = samples_knob(32)
    seq_len: int = seq_len_knob()
    sequential: bool = sequential_knob()
    calib_text: str = text_knob()
    reconstruct: int = reconstruct_knob()


@dataclass(frozen=True)
class SparseGPT(_Nonuniform):
    """SparseGPT: second-order pruning that updates the remaining weights to keep each layer's output."""

    sparsity: float = sparsity_knob()
    pattern: str = knob("unstructured", choices=PATTERNS, help=PATTERN_HELP)
    nonuniform: float = nonuniform_knob()
    damping: float = damping_knob()
    samples: int = samples_knob()
    seq_len: int = seq_len_knob()
    sequential: bool = sequential_knob()
    calib_text: str = text_knob()
    reconstruct: int = reconstruct_knob()


def wanda_mask(W, norm, sparsity: float, pattern):
    """(out, in) bool, True = prune. Scores |W_ij| * ||X_j||, compared within a row (or an N:M run)."""
    import torch
    score = W.abs() * norm[None, :]
    out, inp = W.shape
    if pattern is not None:
        n, m = pattern
        g = score.reshape(out, inp // m, m)
        idx = g.topk(n, dim=-1, largest=False).indices
        return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(out, inp)
    k = int(inp * sparsity)
    mask = torch.zeros_like(W, dtype=torch.bool)
    if k:
        mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
    return mask


def sparsegpt_solve(W, H, sparsity: float, pattern, damping: float, block: int = 128, rows=None):
    """SparseGPT on one weight. W: (out, in), H: (in, in) -> pruned and updated W (out, in).
    rows: (out,) weights of each output's error in the unstructured mask choice (e.g. the loss
    gradient's second moment there), so rows that cost more loss give up fewer weights."""
    import torch
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    out, n = W.shape
    dead = H.diagonal() <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damping * H.diagonal().mean())
    Hinv = _inverse_cholesky(H)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, E1 = W[:, i1:i2].clone(), torch.zeros(out, i2 - i1)
        Hb = Hinv[i1:i2, i1:i2]
        d = Hb.diagonal()
        if pattern is None:  # the block's weights with the least saliency w^2 / [H^-1]_jj^2
            sal = W1 ** 2 / d[None, :] ** 2
            if rows is not None:
                sal = sal * rows[:, None]
            k = int(sal.numel() * sparsity)
            mask = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                mask.view(-1)[sal.view(-1).topk(k, largest=False).indices] = True
        else:
            mask = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                nz, m = pattern
                sal = W1[:, i:i + m] ** 2 / d[i:i + m][None, :] ** 2
                mask.scatter_(1, i + sal.topk(nz, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = torch.where(mask[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hb[i, i]
            W1[:, i:] -= err[:, None] * Hb[i, i:][None, :]
            W1[:, i] = q
            E1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return W


def _check_pattern(model, pattern):
    if pattern is None:
        return
    from .base import target_linears
    from ..errors import RecipeError
    bad = [n for n, m in target_linears(model) if m.in_features % pattern[1]]
    if bad:
        raise RecipeError(f"the {pattern[0]}:{pattern[1]} pattern needs input sizes divisible by {pattern[1]}; "
                          f"{bad[0]} has {dict(target_linears(model))[bad[0]].in_features}", field="pattern")


def sparsity_plan(model, ctx: StepContext, cfg) -> tuple[dict[str, float], dict]:
    """{Linear name: sparsity}: the model-wide ranking of g2_k W_kj^2 |X_j|^2 (the loss that zeroing
    one weight costs, to second order, with g2 the loss gradient's second moment at output k) sets
    each Linear's share; nonuniform moves each from cfg.sparsity toward it. The mean over weights stays
    cfg.sparsity (one threshold over all of them)."""
    import torch

    from .. import calibration

    g2 = calibration.grad_moments(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text)
    stats = calibration.calibrate(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text, share=0.3)
    layers = calibration.decoder_layers(model)
    prefix = calibration.layers_prefix(model, layers)
    scores = {}
    for i in range(len(layers)):
        st = stats.layer(i)
        for short, m in layers[i].named_modules():
            name = f"{prefix}.{i}.{short}"
            if isinstance(m, torch.nn.Linear) and short in st and name in g2:
                w = m.weight.detach().float()
                scores[name] = g2[name][:, None] * w ** 2 * st[short].col_norm()[None, :] ** 2  # (out, in)
    # one threshold over every weight, from an even subsample (the full set is the model's size again)
    sample = torch.cat([v.flatten()[::16] for v in scores.values()])
    thr = sample.kthvalue(max(1, int(cfg.sparsity * sample.numel()))).values
    plan = {}
    for name, v in scores.items():
        share = float((v <= thr).float().mean())
        plan[name] = min(0.95, max(0.0, cfg.sparsity + cfg.nonuniform * (share - cfg.sparsity)))
    return plan, g2  # a Linear without statistics or gradient keeps the slider's sparsity (_prune's default)


def _prune(model, ctx: StepContext, cfg, solve_one) -> dict:
    from ..calibration import each_layer
    from ..packing import NMTensor
    pattern = nm(cfg.pattern)
    _check_pattern(model, pattern)
    zeros = total = 0
    err = 0.0
    plan, g2 = {}, {}
    if cfg.uses_loss_gradients:
        plan, g2 = sparsity_plan(model, ctx, cfg)

    def per_layer(i, lin, _st):
        nonlocal zeros, total, err
        for name, (m, st) in lin.items():
            ctx.check_cancel()
            W = m.weight.data
            new = solve_one(W, st, plan.get(name, cfg.sparsity), g2.get(name))
            err += layer_error(W, new, st.hessian())
            W.copy_(new)
            zeros += int((new == 0).sum())
            total += new.numel()
            if pattern is not None:  # compact storage: kept values + their positions
                ctx.packed[f"{name}.weight"] = NMTensor(m.weight, pattern[1] - pattern[0], pattern[1])

    teacher = copy.deepcopy(model) if cfg.reconstruct else None  # the unpruned model, for the reconstruction
    split = 1.0
    if teacher is not None:  # the progress bar's share of each phase: their expected times (preflight's model)
        from ..preflight import calibration_seconds, reconstruct_seconds
        prune = calibration_seconds(cfg.samples, cfg.sequential, 1.0)
        split = prune / (prune + reconstruct_seconds(cfg.reconstruct, cfg.samples, cfg.seq_len, 1.0))
    with ctx.part(0.0, split):
        each_layer(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text, per_layer, cfg.sequential)
    info = {"sparsity": zeros / max(total, 1), "pattern": cfg.pattern, "output_error": err}
    if teacher is not None:
        from ..calibration import samples, text_path
        from .reconstruct import reconstruct
        # windows other than those the masks were chosen on: the layers fit the text, not those windows
        ids = samples(ctx.tokenizer, text_path(cfg.calib_text), cfg.samples, cfg.seq_len, seed=1)
        with ctx.part(split, 1.0):
            info.update(reconstruct(model, teacher, ids, ctx, cfg.reconstruct))
        del teacher
    if plan:
        info["sparsity_range"] = [round(min(plan.values()), 4), round(max(plan.values()), 4)]
    return info


@technique(Wanda, name="wanda", family="pruning")
def wanda(model, cfg: Wanda, ctx: StepContext) -> dict:
    pattern = nm(cfg.pattern)

    def one(W, st, sparsity, _rows):  # wanda compares within a row: a row weight changes nothing
        return W * ~wanda_mask(W, st.col_norm(), sparsity, pattern)

    return _prune(model, ctx, cfg, one)


@technique(SparseGPT, name="sparsegpt", family="pruning")
def sparsegpt(model, cfg: SparseGPT, ctx: StepContext) -> dict:
    pattern = nm(cfg.pattern)

    def one(W, st, sparsity, rows):
        return sparsegpt_solve(W, st.hessian(), sparsity, pattern, cfg.damping, rows=rows)

    return _prune(model, ctx, cfg, one)
