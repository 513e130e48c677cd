"""Early exit: stop the decoder at an intermediate layer when a tiny confidence head says the
next token would not change, reusing the final norm and the LM head.

At each exit point an adapter (on by default) first maps the layer's hidden state to an estimate
of the last layer's: an affine map fitted on calibration text by least squares, each token's
error measured relative to the size of its target (a "tuned lens"). Read raw through the final
norm and LM head, SmolLM2's layer 2/3 deep is 15-19 nats (KL) from the full model's next-token
distribution; through its adapter ~1 nat, and at layer 29 half the tokens within 0.1 nats.

The head at each exit point is a logistic regression on the final-normed (adapted) hidden state (hidden
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
in the results). The saved variant carries the heads in its runtime entry "early_exit:<json>" and
the adapters as weights (model.exit_adapters.<layers run>).
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
    tolerance: float = knob(0.1, min=0.01, max=1.0, step=0.01, unit="nats", scale="log",
                            help="A token may leave at a layer whose next-token distribution is within this "
                                 "KL divergence of the full model's (what the heads learn to predict).")
    budget: float = knob(0.1, min=0.01, max=0.7, step=0.01, unit="nats",
                         help="For the recommended threshold: the mean KL over all calibration tokens that "
                              "exiting may cost (0.1 nats ~ 1.1x perplexity).")
    first_exit: float = knob(0.5, min=0.1, max=0.95, step=0.05, unit="fraction",
                             help="Earliest exit point, as a fraction of the decoder's depth.")
    every: int = knob(2, min=1, max=8, step=1, unit="layers", help="An exit point every this many layers after the first.")
    adapter: bool = knob(True, help="Per exit point, an affine map (hidden x hidden) fitted on the calibration text "
                                    "from that layer's hidden state to the last layer's, read by the final norm "
                                    "and LM head (a tuned lens): far closer to the full model's prediction than "
                                    "the raw layer; costs a ninth of a decoder layer when a token exits.")
    samples: int = samples_knob(32)
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
    inner = model.model

    def step(b):
        ctx.check_cancel()
        if b:
            ctx.progress(0.4 * b / len(ids), f"early exit: calibration {b}/{len(ids)}")

    raw, last = exit_states(model, ids, points, step)
    folds = [list(range(0, len(ids), 2)), list(range(1, len(ids), 2))]
    adapters, scored_by = {}, {}  # scored_by[p][b]: the adapter that scores window b at exit p
    if cfg.adapter:
        # Cross-fitted: a window's exits are scored by adapters fitted on the other half of the
        # windows. Scored in-sample (a hidden x hidden map fitted on a few thousand tokens), the exits
        # look far closer to the full model than they are on new text, and the heads learn to exit
        # too often (tried: 2.7x perplexity at the recommended threshold).

        def fit(p, bs):  # position 0 (BOS, the attention sink) left out
            return fit_adapter(torch.cat([raw[p][b][1:] for b in bs]), torch.cat([last[b][1:] for b in bs]))

        for k, p in enumerate(points):
            ctx.check_cancel()
            adapters[p] = fit(p, range(len(ids)))  # what runs: fitted on every window
            scored_by[p] = _cross_fitted(folds, lambda bs: fit(p, bs))
            ctx.progress(0.4 + 0.1 * (k + 1) / len(points), f"early exit: adapter {k + 1}/{len(points)}")
        inner.exit_adapters = torch.nn.ModuleDict({str(p): a for p, a in adapters.items()})
    feats = {p: [] for p in points}
    kl = {p: [] for p in points}
    with torch.no_grad():
        for b in range(len(ids)):
            ctx.check_cancel()
            final = torch.log_softmax(model.lm_head(inner.norm(last[b])).float(), -1)  # (T, V)
            for p in points:
                a = scored_by.get(p, {}).get(b, adapters.get(p))
                f = inner.norm(a(raw[p][b]) if a is not None else raw[p][b])             # (T, d)
                feats[p].append(f)
                kl[p].append(exit_kl(final, model.lm_head(f)))
            ctx.progress(0.5 + 0.3 * (b + 1) / len(ids), f"early exit: exits scored {b + 1}/{len(ids)}")
    heads, probs, labels = {}, {}, {}
    for k, p in enumerate(points):
        ctx.check_cancel()
        def fit_head(bs):
            return _fit_logistic(torch.cat([feats[p][b] for b in bs]),
                                 (torch.cat([kl[p][b] for b in bs]) <= cfg.tolerance).float())

        heads[p] = fit_head(range(len(ids)))
        # the recommendation simulates each window with heads fitted on the other half of the windows:
        # in-sample, a 577-number head looks surer than it is on new text
        by = _cross_fitted(folds, fit_head)
        probs[p] = torch.cat([torch.sigmoid(f @ w + bias) for b, f in enumerate(feats[p])
                              for w, bias in [by.get(b, heads[p])]])
        labels[p] = torch.cat(kl[p])
        ctx.progress(0.8 + 0.2 * (k + 1) / len(points), f"early exit: head {k + 1}/{len(points)}")
    table = [_simulate(probs, labels, points, n_layers, t) for t in GRID]
    ok = [r for r in table if r["mean_kl"] <= cfg.budget]
    recommended = ok[0]["threshold"] if ok else GRID[-1]
    threshold = cfg.threshold or recommended
    entry = {"points": points, "threshold": threshold, "adapter": bool(adapters),
             "heads": {str(p): [[round(float(v), 6) for v in heads[p][0]], round(float(heads[p][1]), 6)]
                       for p in points}}
    ctx.runtime.append("early_exit:" + json.dumps(entry, separators=(",", ":")))
    attach(model, entry)
    at = _simulate(probs, labels, points, n_layers, threshold)
    ctx.log(f"early exit: threshold {threshold:.3f} (recommended {recommended:.3f}); on the calibration text "
            f"{at['layers_per_token']:.1f} of {n_layers} layers per token, mean KL {at['mean_kl']:.3f} nats")
    return {"exit_points": points, "threshold": threshold, "recommended_threshold": recommended,
            "adapter": bool(adapters), "calib_mean_kl_per_exit": {p: round(float(labels[p].mean()), 4) for p in points},
            "calib_layers_per_token": at["layers_per_token"], "calib_mean_kl": at["mean_kl"],
            "threshold_table": table}


def exit_states(model, ids, points: list[int], each=lambda b: None) -> tuple[dict, list]:
    """Runs each window of ids (N, T) through every layer -> ({p: per window (T, d) hidden state after p
    layers}, per window (T, d) the last layer's output before the final norm). each(b) is called before
    window b and once after the last (b = N)."""
    import torch
    raw = {p: [] for p in points}
    last = []
    grab = model.model.layers[-1].register_forward_hook(
        lambda _m, _a, out: last.append((out[0] if isinstance(out, tuple) else out)[0]))
    try:
        with torch.no_grad():
            for b in range(len(ids)):
                each(b)
                out = model(ids[b:b + 1], output_hidden_states=True, use_cache=False)
                for p in points:
                    raw[p].append(out.hidden_states[p][0])
        each(len(ids))
    finally:
        grab.remove()
    return raw, last


def exit_kl(full_logp, exit_logits):
    """Per position KL(full || exit) in nats: full_logp (T, V) the full model's log-probabilities,
    exit_logits (T, V) the LM head read at the exit."""
    import torch
    mine = torch.log_softmax(exit_logits.float(), -1)
    return (full_logp.exp() * (full_logp - mine)).sum(-1).clamp(min=0)


def _cross_fitted(folds: list[list[int]], fit) -> dict:
    """{window: what `fit` makes of the other fold's windows} (two folds); {} when a fold is empty."""
    if not all(folds):
        return {}
    return {b: f for mine, other in (folds, folds[::-1]) for f in [fit(other)] for b in mine}


def fit_adapter(x, y, ridge: float = 1e-3):
    """nn.Linear(d, d) A with A(x) ~ y (x, y: (N, d) hidden states), by least squares with each token's
    error relative to the size (RMS) of its target, so that the few tokens with huge activations do
    not outweigh the rest; ridge pulls towards the identity (the raw layer)."""
    import torch
    n, d = x.shape
    wt = (1.0 / y.double().pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6))           # (N, 1)
    xa = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], 1) * wt           # (N, d + 1)
    g = xa.T @ xa
    lam = ridge * g.diagonal().mean()
    eye0 = torch.cat([torch.eye(d, dtype=torch.float64), torch.zeros(1, d, dtype=torch.float64)])
    sol = torch.linalg.solve(g + lam * torch.eye(d + 1, dtype=torch.float64), xa.T @ (y.double() * wt) + lam * eye0)
    lin = torch.nn.Linear(d, d, dtype=x.dtype)
    with torch.no_grad():
        lin.weight.copy_(sol[:d].T)
        lin.bias.copy_(sol[d])
    return lin


def add_adapters(model, entry: dict) -> None:
    """Empty adapter modules where a saved variant's weights will be loaded (before load_state_dict)."""
    import torch
    if entry.get("adapter"):
        d = model.config.hidden_size
        model.model.exit_adapters = torch.nn.ModuleDict({str(p): torch.nn.Linear(d, d) for p in entry["points"]})


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
        ad = getattr(inner, "exit_adapters", None) if entry.get("adapter") else None
        self.adapters = {int(p): a for p, a in ad.items()} if ad is not None else {}
        self.n_layers = len(inner.layers)
        self.layers_run: dict[str, list[float]] = {"window": [], "decode": []}  # per token
        self.reset_step()

    def reset_step(self):
        self.exited = None   # decode: the exited hidden state; windows: (T,) bool mask
        self.out = None      # decode: what the final norm reads for the exited token (adapted)
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
                fill_kv(layer, state.exited, kw)  # from the layer's own state: what the next layer would read
                return _finish(state, state.out) if last else state.exited
            h = orig(hidden_states, *args, **kw)                               # (B, T, d)
            if n in state.points:
                w, b = state.heads[n]
                x = state.adapters[n](h) if n in state.adapters else h         # (B, T, d) estimate of the last layer's
                conf = torch.sigmoid(state.norm(x) @ w + b)                    # (B, T)
                if h.shape[1] == 1:
                    if bool((conf >= state.threshold).all()):
                        state.exited, state.out, state.depth = h, x, float(n)
                else:  # a window: every position keeps going; remember where each would have left
                    if state.chosen is None:
                        state.chosen, state.depth = x.clone(), torch.full(h.shape[:2], float(state.n_layers))
                        state.exited = torch.zeros(h.shape[:2], dtype=torch.bool)
                    new = (conf >= state.threshold) & ~state.exited
                    state.chosen[new], state.depth[new] = x[new], float(n)
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
