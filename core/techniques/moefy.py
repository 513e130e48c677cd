"""MoE-fication of the dense SwiGLU FFN: each decoder layer's intermediate neurons are split into
`experts` equal groups, a linear router per layer picks each token's `top_k` groups, and only those
groups' slices of gate/up/down are computed.

Clustering: balanced k-means on the neurons' co-activation (each neuron described by its |activation|
over calibration tokens, normalised), so neurons that fire together share an expert and a token's
activation mass concentrates in few experts (MoEfication, Zhang et al. 2022). The "weights" choice
clusters the gate/up weight rows instead (no calibration needed for the clustering, usually worse).

Router: a least-squares (ridge) linear map from the FFN input to each expert's output norm on the
calibration tokens; the top-k scores pick the experts. The chosen experts' outputs are summed
unweighted, so with top_k = experts the FFN is exactly the dense one.

Storage: the gate/up rows and down columns are permuted so each expert is a contiguous neuron range
(the dense function is unchanged), and the routers (hidden x experts floats per layer, base64 float32)
go in the runtime entry "moefy:<json>", re-attached by load_variant.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from .base import StepContext, knob
from .gptq import samples_knob, seq_len_knob, text_knob
from .registry import technique


@dataclass(frozen=True)
class MoEfy:
    """MoE-fication: split each FFN into experts with a router; run only the top-k experts per token."""

    experts: int = knob(8, min=2, max=32, step=1, unit="experts",
                        help="Groups each FFN's intermediate neurons are split into (equal sizes).")
    top_k: int = knob(2, min=1, max=32, step=1, unit="experts",
                      help="Experts computed per token; FFN cost is about top_k / experts of dense.")
    cluster: str = knob("activation", choices=("activation", "weights"),
                        help="Group neurons that fire together on the calibration text (activation) "
                             "or whose gate/up weight rows are alike (weights).")
    compensate: bool = knob(True, help="Add each skipped expert's mean output on the calibration text (a constant "
                                       "vector, no multiplications) in place of computing it.")
    samples: int = samples_knob(16)
    seq_len: int = seq_len_knob(256)
    calib_text: str = text_knob()

    def check(self) -> None:
        from ..errors import RecipeError
        if self.top_k > self.experts:
            raise RecipeError(f"moefy.top_k ({self.top_k}) is more than moefy.experts ({self.experts})",
                              field="top_k")


def _b64(t) -> str:
    return base64.b64encode(t.detach().float().contiguous().numpy().tobytes()).decode()


def _unb64(s: str, shape):
    import numpy as np
    import torch
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.float32).copy()).reshape(shape)


def expert_bounds(n: int, experts: int) -> list[int]:
    """Start of each expert's neuron range, plus n: sizes differ by at most one."""
    base, extra = divmod(n, experts)
    out = [0]
    for e in range(experts):
        out.append(out[-1] + base + (e < extra))
    return out


def flops_ratio(hidden: int, inter: int, experts: int, top_k: int) -> float:
    """FFN multiply-adds per token relative to dense: the k largest experts' share (an upper bound when
    sizes differ by one) plus the router's hidden x experts."""
    b = expert_bounds(inter, experts)
    sizes = sorted((b[e + 1] - b[e] for e in range(experts)), reverse=True)
    return (3 * hidden * sum(sizes[:top_k]) + hidden * experts) / (3 * hidden * inter)


def balanced_kmeans(feats, experts: int, iters: int = 15, seed: int = 0):
    """(n,) expert of each row of feats (n, f), every expert holding the sizes of expert_bounds.

    Lloyd iterations whose assignment step respects the sizes (_capacity_assign)."""
    import torch
    n = feats.shape[0]
    b = expert_bounds(n, experts)
    cap0 = torch.tensor([b[e + 1] - b[e] for e in range(experts)])
    g = torch.Generator().manual_seed(seed)
    centres = feats[torch.randperm(n, generator=g)[:experts]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = _capacity_assign(torch.cdist(feats, centres), cap0)
        if torch.equal(new, assign):
            break
        assign = new
        for e in range(experts):
            centres[e] = feats[assign == e].mean(0)
    return assign


def _capacity_assign(d, cap):
    """Each row to a column, column e taking cap[e] rows: in rounds, every unplaced row proposes to its
    nearest column with room, and each column accepts its nearest proposers up to its room."""
    import torch
    n, E = d.shape
    out = torch.full((n,), -1, dtype=torch.long)
    room = cap.clone()
    while bool((out < 0).any()):
        free = torch.nonzero(out < 0).flatten()
        dd = d[free].clone()
        dd[:, room == 0] = float("inf")
        best = dd.argmin(1)
        for e in best.unique().tolist():
            who = free[best == e]
            take = who[d[who, e].argsort()[:int(room[e])]]
            out[take] = e
            room[e] -= len(take)
    return out


@technique(MoEfy, name="moefy", family="architecture")
def moefy(model, cfg: MoEfy, ctx: StepContext) -> dict:
    import torch

    from ..calibration import decoder_layers, samples, text_path
    from ..errors import DataError, RecipeError

    if ctx.tokenizer is None:
        raise DataError("moefy needs the model's tokenizer for its calibration text")
    layers = decoder_layers(model)
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise DataError("moefy needs a SwiGLU FFN (gate_proj / up_proj / down_proj) in every decoder layer")
        if getattr(mlp, "_moefy", None) is not None:
            raise RecipeError("moefy was already applied to this model", field="technique")
    inter = layers[0].mlp.gate_proj.out_features
    if cfg.experts > inter:
        raise RecipeError(f"moefy.experts ({cfg.experts}) is more than the FFN's {inter} neurons", field="experts")

    # 1. the FFN inputs of every layer on the calibration text (the dense model; BOS dropped: its
    # massive activations are not what tokens look like)
    ids = samples(ctx.tokenizer, text_path(cfg.calib_text), cfg.samples, cfg.seq_len)
    xs = {i: [] for i in range(len(layers))}

    def hook(i):
        def fn(_mod, args):
            xs[i].append(args[0][:, 1:].reshape(-1, args[0].shape[-1]).detach().float())
        return fn

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for b in range(0, len(ids), 4):
                ctx.check_cancel()
                model(ids[b:b + 4], use_cache=False)
                ctx.progress(0.3 * min(1.0, (b + 4) / len(ids)), "moefy: calibration")
    finally:
        for h in handles:
            h.remove()

    # 2. per layer: cluster, permute, fit the router
    bounds = expert_bounds(inter, cfg.experts)
    entry = {"experts": cfg.experts, "top_k": cfg.top_k, "bounds": bounds, "layers": []}
    fit_err = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            ctx.check_cancel()
            mlp = layer.mlp
            X = torch.cat(xs.pop(i))                                              # (N, h)
            Wg, Wu, Wd = (m.weight.detach().float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
            act = torch.nn.functional.silu(X @ Wg.T) * (X @ Wu.T)                 # (N, I)
            if cfg.cluster == "activation":
                f = act.abs().T                                                   # (I, N)
            else:
                f = torch.cat([Wg, Wu], 1)
            f = f / f.norm(dim=1, keepdim=True).clamp(min=1e-8)
            assign = balanced_kmeans(f, cfg.experts, seed=i)
            perm = torch.cat([torch.nonzero(assign == e).flatten() for e in range(cfg.experts)])
            for m in (mlp.gate_proj, mlp.up_proj):
                m.weight.data = m.weight.data[perm].contiguous()
                if m.bias is not None:
                    m.bias.data = m.bias.data[perm].contiguous()
            mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, perm].contiguous()
            act, Wd = act[:, perm], Wd[:, perm]
            # each expert's output norm per token: what the router learns to rank
            y = torch.stack([(act[:, bounds[e]:bounds[e + 1]] @ Wd[:, bounds[e]:bounds[e + 1]].T).norm(dim=1)
                             for e in range(cfg.experts)], 1)                     # (N, E)
            w, bias = _ridge(X, y)
            le = {"w": _b64(w), "b": _b64(bias)}
            if cfg.compensate:  # each expert's mean output: what a token that skips it gets instead
                le["m"] = _b64(torch.stack([act[:, bounds[e]:bounds[e + 1]].mean(0) @ Wd[:, bounds[e]:bounds[e + 1]].T
                                            for e in range(cfg.experts)]))
            entry["layers"].append(le)
            pred = (X @ w.T + bias).topk(cfg.top_k, 1).indices
            best = y.topk(cfg.top_k, 1).indices
            hit = (pred[:, :, None] == best[:, None, :]).any(2).float().mean()
            fit_err.append(float(hit))
            ctx.progress(0.3 + 0.7 * (i + 1) / len(layers), f"moefy: layer {i + 1}/{len(layers)}")
    ctx.runtime.append("moefy:" + json.dumps(entry, separators=(",", ":")))
    attach(model, entry)
    hidden = layers[0].mlp.gate_proj.in_features
    ratio = flops_ratio(hidden, inter, cfg.experts, cfg.top_k)
    recall = sum(fit_err) / len(fit_err)
    ctx.log(f"moefy: {cfg.top_k} of {cfg.experts} experts per token, FFN FLOPs {ratio:.3f}x dense; the router "
            f"finds {recall:.0%} of the calibration tokens' top-{cfg.top_k} experts")
    return {"experts": cfg.experts, "top_k": cfg.top_k, "ffn_flops_ratio": round(ratio, 4),
            "router_recall": round(recall, 4), "router_recall_per_layer": [round(r, 3) for r in fit_err]}


def _ridge(X, y, lam: float = 1e-3):
    """(w (E, h), b (E,)) minimising ||X w^T + b - y||^2 + lam * tr(X^T X)/h * ||w||^2."""
    import torch
    Xc = X.double()
    mx, my = Xc.mean(0), y.double().mean(0)
    Xc = Xc - mx
    A = Xc.T @ Xc
    A += lam * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype)
    w = torch.linalg.solve(A, Xc.T @ (y.double() - my)).T                     # (E, h)
    b = my - w @ mx
    return w.float(), b.float()


class _Routed:
    """One layer's router and counters: expert_tokens[e] = tokens that expert e was computed for."""

    def __init__(self, w, b, bounds, top_k):
        self.w, self.b, self.bounds, self.top_k = w, b, bounds, top_k
        self.experts = len(bounds) - 1
        self.mean = None      # (E, h) each expert's mean output, added for the skipped ones
        self.oracle = False   # diagnostics only: route by each expert's true output norm (computes all)
        self.expert_tokens = [0] * self.experts
        self.tokens = 0


def attach(model, entry: dict) -> None:
    """Replaces each decoder layer's FFN forward by the routed one (weights already permuted)."""
    import torch
    from torch.nn import functional as F

    from ..calibration import decoder_layers

    bounds, k = list(entry["bounds"]), int(entry["top_k"])
    E = len(bounds) - 1
    for layer, le in zip(decoder_layers(model), entry["layers"]):
        mlp = layer.mlp
        h = mlp.gate_proj.in_features
        st = _Routed(_unb64(le["w"], (E, h)), _unb64(le["b"], (E,)), bounds, k)
        if "m" in le:
            st.mean = _unb64(le["m"], (E, mlp.down_proj.out_features))
        mlp._moefy = st

        def forward(x, mlp=mlp, st=st):
            if not all(isinstance(getattr(m, "weight", None), torch.Tensor)
                       for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
                return _masked(mlp, st, x)  # e.g. dynamic int8 Linears: no weight slices to take
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            n = x2.shape[0]
            st.tokens += n
            Wg, Wu, Wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            if Wg.shape[0] != bounds[-1]:
                from ..errors import ModelError
                raise ModelError(f"moefy's experts cover {bounds[-1]} FFN neurons but the layer now has "
                                 f"{Wg.shape[0]}: change the FFN's width before moefy, not after")
            bg, bu = mlp.gate_proj.bias, mlp.up_proj.bias
            bd = mlp.down_proj.bias
            act_fn = mlp.act_fn

            def part(xe, s, t):
                g = F.linear(xe, Wg[s:t], None if bg is None else bg[s:t])
                u = F.linear(xe, Wu[s:t], None if bu is None else bu[s:t])
                return F.linear(act_fn(g) * u, Wd[:, s:t])

            scores = F.linear(x2, st.w.to(x2.dtype), st.b.to(x2.dtype))          # (n, E)
            if st.oracle:
                scores = torch.stack([part(x2, bounds[e], bounds[e + 1]).norm(dim=1) for e in range(st.experts)], 1)
            top = scores.topk(st.top_k, 1).indices                               # (n, k)
            if n == 1:  # decoding: only this token's k slices
                out = None
                for e in top[0].tolist():
                    st.expert_tokens[e] += 1
                    y = part(x2, bounds[e], bounds[e + 1])
                    out = y if out is None else out + y
            else:
                out = torch.zeros(n, Wd.shape[0], dtype=x2.dtype, device=x2.device)
                chosen = torch.zeros(n, st.experts, dtype=torch.bool, device=x2.device)
                chosen.scatter_(1, top, True)
                for e in range(st.experts):
                    idx = torch.nonzero(chosen[:, e]).flatten()
                    if idx.numel() == 0:
                        continue
                    st.expert_tokens[e] += idx.numel()
                    # (under bf16 autocast, as distill trains, the parts come back in bf16)
                    out.index_add_(0, idx, part(x2[idx], bounds[e], bounds[e + 1]).to(out.dtype))
            if st.mean is not None and st.top_k < st.experts:
                m = st.mean.to(x2.dtype)
                if n == 1:
                    out = out + (m.sum(0) - m[top[0]].sum(0))
                else:
                    out = out + (~chosen).to(x2.dtype) @ m
            if bd is not None:
                out = out + bd
            return out.reshape(*shape[:-1], Wd.shape[0])

        mlp.forward = forward


def _masked(mlp, st: _Routed, x):
    """The routed FFN for projections whose weights cannot be sliced (quantized kernels): every neuron
    computed, the skipped experts' zeroed (same numbers, no speed-up)."""
    import torch
    a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)                             # (..., I)
    flat = x.reshape(-1, x.shape[-1])
    top = (flat @ st.w.T.to(x.dtype) + st.b.to(x.dtype)).topk(st.top_k, -1).indices
    chosen = torch.zeros(flat.shape[0], st.experts, dtype=torch.bool).scatter_(1, top, True)
    sizes = torch.tensor([st.bounds[e + 1] - st.bounds[e] for e in range(st.experts)])
    keep = chosen.repeat_interleave(sizes, dim=1).reshape(*a.shape).to(a.dtype)
    st.tokens += flat.shape[0]
    for e, c in enumerate(chosen.sum(0).tolist()):
        st.expert_tokens[e] += c
    out = mlp.down_proj(a * keep)
    if st.mean is not None and st.top_k < st.experts:
        out = out + ((~chosen).to(x.dtype) @ st.mean.to(x.dtype)).reshape(out.shape)
    return out


def attach_from(model, entry: str) -> None:
    attach(model, json.loads(entry.split(":", 1)[1]))


def experts_per_token(model, reset: bool = True) -> float | None:
    """Mean experts computed per token per layer since the last call; None without moefy."""
    from ..calibration import decoder_layers
    try:
        states = [getattr(layer.mlp, "_moefy", None) for layer in decoder_layers(model)]
    except Exception:
        return None
    states = [s for s in states if s is not None]
    if not states:
        return None
    tokens = sum(s.tokens for s in states)
    mean = sum(sum(s.expert_tokens) for s in states) / tokens if tokens else None
    if reset:
        for s in states:
            s.tokens, s.expert_tokens = 0, [0] * s.experts
    return mean
