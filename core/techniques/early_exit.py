"""Early exit: stop the decoder at an intermediate layer when a tiny confidence head says the
next token would not change, reusing the final norm and the LM head.

The head at each exit point is a logistic regression on the final-normed hidden state (hidden
size + 1 numbers), fitted on calibration text to predict "this layer's next-token distribution is
within `tolerance` nats (KL) of the full model's": checking it costs a dot product, not an LM-head
product (the LM head of SmolLM2 is as large as 8 decoder layers). Top-1 agreement is not enough:
an intermediate layer can pick the same top token with a far flatter or sharper distribution,
and perplexity pays for the whole distribution (tried first: 95 % top-1 agreement gave 40x ppl). When a token exits during decoding, the layers it skips
still get their KV entries, computed from the exited hidden state (CALM's state propagation: k/v
projections only), so later tokens attend as usual.

Perplexity windows (many positions at once) run every layer and take each position's logits
from its first confident exit; later positions then see full-depth keys and values for earlier
ones, so window perplexity is a slightly optimistic estimate of token-by-token decoding (stated
in the results). The saved variant carries the heads in its runtime entry "early_exit:<json>".
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .base import StepContext, knob
from .gptq import samples_knob, seq_len_knob, text_knob
from .registry import technique

GRID = tuple(round(0.5 + 0.025 * i, 3) for i in range(20))  # 0.5 .. 0.975  # thresholds tried for the recommendation


@dataclass(frozen=True)
class EarlyExit:
    """Early exit: leave the decoder at an intermediate layer when a tiny confidence head clears a threshold."""

    threshold: float = knob(0.0, min=0.0, max=0.99, step=0.01, unit="confidence", labels={0.0: "auto"},
                            help="Exit when the head's confidence that the next token is already settled "
                                 "reaches this; 0 = the threshold recommended on the calibration text.")
    tolerance: float = knob(0.1, min=0.01, max=1.0, step=0.01, unit="nats",
                            help="A token may leave at a layer whose next-token distribution is within this "
                                 "KL divergence of the full model's (what the heads learn to predict).")
    budget: float = knob(0.1, min=0.01, max=0.7, step=0.01, unit="nats",
                         help="For the recommended threshold: the mean KL over all calibration tokens that "
                              "exiting may cost (0.1 nats ~ 1.1x perplexity).")
    first_exit: float = knob(0.5, min=0.1, max=0.95, step=0.05, unit="of layers",
                             help="Earliest exit point, as a fraction of the decoder's depth.")
    every: int = knob(2, min=1, max=8, step=1, unit="layers", help="An exit point every this many layers after the first.")
    samples: int = samples_knob(16)
    seq_len: int = seq_len_knob(256)
    calib_text: str = text_knob()


def exit_points(n_layers: int, first_exit: float, every: int) -> list[int]:
    """Numbers of layers run at each exit point (< n_layers: the last layer is the normal end)."""
    first = max(1, round(n_layers * first_exit))
    return list(range(first, n_layers, every))


@technique(EarlyExit, name="early_exit", family="architecture", needs_float=False)
def early_exit(model, cfg: EarlyExit, ctx: StepContext) -> dict:
    import torch

    from ..calibration import decoder_layers, samples, text_path
    from ..errors import DataError

    if ctx.tokenizer is None:
        raise DataError("early_exit needs the model's tokenizer for its calibration text")
    n_layers = len(decoder_layers(model))
    points = exit_points(n_layers, cfg.first_exit, cfg.every)
    if not points:
        raise DataError(f"no exit point: the model has {n_layers} layers; lower first_exit")
    ids = samples(ctx.tokenizer, text_path(cfg.calib_text), cfg.samples, cfg.seq_len)
    feats = {p: [] for p in points}
    kl = {p: [] for p in points}
    inner = model.model
    with torch.no_grad():
        for b in range(len(ids)):
            ctx.check_cancel()
            out = model(ids[b:b + 1], output_hidden_states=True, use_cache=False)
            final = torch.log_softmax(out.logits[0].float(), -1)               # (T, V)
            for p in points:
                f = inner.norm(out.hidden_states[p][0])                        # (T, d)
                feats[p].append(f)
                mine = torch.log_softmax(model.lm_head(f).float(), -1)
                kl[p].append((final.exp() * (final - mine)).sum(-1).clamp(min=0))  # KL(full || exit)
            ctx.progress(0.6 * (b + 1) / len(ids), f"early exit: calibration {b + 1}/{len(ids)}")
    heads, probs, labels = {}, {}, {}
    for k, p in enumerate(points):
        ctx.check_cancel()
        X, d = torch.cat(feats[p]), torch.cat(kl[p])
        heads[p] = _fit_logistic(X, (d <= cfg.tolerance).float())
        w, bias = heads[p]
        probs[p], labels[p] = torch.sigmoid(X @ w + bias), d
        ctx.progress(0.6 + 0.4 * (k + 1) / len(points), f"early exit: head {k + 1}/{len(points)}")
    table = [_simulate(probs, labels, points, n_layers, t) for t in GRID]
    ok = [r for r in table if r["mean_kl"] <= cfg.budget]
    recommended = ok[0]["threshold"] if ok else GRID[-1]
    threshold = cfg.threshold or recommended
    entry = {"points": points, "threshold": threshold,
             "heads": {str(p): [[round(float(v), 6) for v in heads[p][0]], round(float(heads[p][1]), 6)]
                       for p in points}}
    ctx.runtime.append("early_exit:" + json.dumps(entry, separators=(",", ":")))
    attach(model, entry)
    at = _simulate(probs, labels, points, n_layers, threshold)
    ctx.log(f"early exit: threshold {threshold:.3f} (recommended {recommended:.3f}); on the calibration text "
            f"{at['layers_per_token']:.1f} of {n_layers} layers per token, mean KL {at['mean_kl']:.3f} nats")
    return {"exit_points": points, "threshold": threshold, "recommended_threshold": recommended,
            "calib_layers_per_token": at["layers_per_token"], "calib_mean_kl": at["mean_kl"],
            "threshold_table": table}


def _fit_logistic(X, y, steps: int = 60):
    """(w (d,), b) of a logistic regression P(y=1 | x), L2-regularised, by LBFGS."""
    import torch
    d = X.shape[1]
    w = torch.zeros(d, requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    X = X.detach()

    def loss_fn():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y) + 1e-4 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(loss_fn)
    return w.detach(), b.detach()


def _simulate(probs: dict, labels: dict, points: list[int], n_layers: int, t: float) -> dict:
    """Each calibration token exits at its first point with confidence >= t: layers run and the mean KL
    from the full model's distribution (0 for tokens that run every layer)."""
    import torch
    n = len(next(iter(probs.values())))
    layers = torch.full((n,), float(n_layers))
    cost = torch.zeros(n)
    done = torch.zeros(n, dtype=torch.bool)
    for p in points:
        go = ~done & (probs[p] >= t)
        layers[go], cost[go] = float(p), labels[p][go]
        done |= go
    return {"threshold": t, "layers_per_token": float(layers.mean()), "mean_kl": float(cost.mean()),
            "exited": float(done.float().mean())}


class _Exit:
    """Per-forward state shared by the wrapped decoder layers."""

    def __init__(self, inner, entry: dict):
        import torch
        self.norm = inner.norm
        self.points = set(entry["points"])
        self.threshold = float(entry["threshold"])
        self.heads = {int(p): (torch.tensor(w), torch.tensor(b)) for p, (w, b) in entry["heads"].items()}
        self.n_layers = len(inner.layers)
        self.layers_run: dict[str, list[float]] = {"window": [], "decode": []}  # per token
        self.reset_step()

    def reset_step(self):
        self.exited = None   # decode: the exited hidden state; windows: (T,) bool mask
        self.chosen = None   # windows: (B, T, d) hidden state taken at each position's exit
        self.depth = None


def attach(model, entry: dict) -> None:
    """Wraps the decoder layers of `model` so that tokens leave at their first confident exit."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    state = _Exit(inner, entry)
    inner._early_exit = state
    inner.register_forward_pre_hook(lambda *_: state.reset_step())

    def fill_kv(layer, h, kw):
        """A skipped layer's keys and values, from the exited hidden state (no attention, no MLP)."""
        cache = kw.get("past_key_values")
        if cache is None:
            return
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = kw["position_embeddings"]
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        cache.update(k, v, attn.layer_idx, {"sin": sin, "cos": cos, "cache_position": kw.get("cache_position")})

    def wrap(i, layer):
        orig = layer.forward

        def forward(hidden_states, *args, **kw):
            n = i + 1  # layers run once this one is done
            last = n == state.n_layers
            if state.exited is not None and hidden_states.shape[1] == 1:  # decode: this token already left
                fill_kv(layer, state.exited, kw)
                return _finish(state, state.exited) if last else state.exited
            h = orig(hidden_states, *args, **kw)                               # (B, T, d)
            if n in state.points:
                w, b = state.heads[n]
                conf = torch.sigmoid(state.norm(h) @ w + b)                    # (B, T)
                if h.shape[1] == 1:
                    if bool((conf >= state.threshold).all()):
                        state.exited, state.depth = h, float(n)
                else:  # a window: every position keeps going; remember where each would have left
                    if state.chosen is None:
                        state.chosen, state.depth = h.clone(), torch.full(h.shape[:2], float(state.n_layers))
                        state.exited = torch.zeros(h.shape[:2], dtype=torch.bool)
                    new = (conf >= state.threshold) & ~state.exited
                    state.chosen[new], state.depth[new] = h[new], float(n)
                    state.exited |= new
            if last:
                if state.chosen is not None:  # windows: each position's state at its exit
                    h = torch.where(state.exited[..., None], state.chosen, h)
                return _finish(state, h)
            return h

        layer.forward = forward

    for i, layer in enumerate(inner.layers):
        wrap(i, layer)


def _finish(state: _Exit, h):
    """Book-keeping at the last layer (layers run per token), then the state for the next forward."""
    import torch
    d = state.depth
    run = state.layers_run["decode" if h.shape[1] == 1 else "window"]
    if d is None:
        run.extend([float(state.n_layers)] * (h.shape[0] * h.shape[1]))
    elif torch.is_tensor(d):
        run.extend(d.reshape(-1).tolist())
    else:
        run.extend([d] * h.shape[0])
    state.reset_step()
    return h


def attach_from(model, entry: str) -> None:
    attach(model, json.loads(entry.split(":", 1)[1]))


def layers_per_token(model, kind: str = "window", reset: bool = True) -> float | None:
    """Mean decoder layers run per token since the last call, over positions of windows (prefill,
    perplexity) or over decoded tokens; None for a model without early exit."""
    state = getattr(getattr(model, "model", None), "_early_exit", None)
    if state is None:
        return None
    run = state.layers_run[kind]
    mean = sum(run) / len(run) if run else None
    if reset:
        for r in state.layers_run.values():
            r.clear()
    return mean
