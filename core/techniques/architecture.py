"""Architecture: techniques that change the model's shapes, so that it computes less.

structured_prune  whole decoder layers (ShortGPT block influence), attention heads and FFN
                  channels go (each run of removed layers optionally replaced by a linear map folded
                  into the down_proj before it, ReplaceMe-style); the result is a plain, smaller Llama: its config.json carries the
                  new num_hidden_layers / num_attention_heads / num_key_value_heads /
                  intermediate_size (and head_dim, explicitly), so `AutoModelForCausalLM.
                  from_pretrained(dir)` of plain transformers loads it.
low_rank          each decoder Linear W (out x in) becomes two Linears, B (out x r) after A (r x in),
                  from a truncated SVD, optionally of W whitened by the calibration inputs
                  (SVD-LLM). Plain transformers' Llama has no factored Linear, and no config field
                  or loader option builds one, so the variant folder carries a small modeling file
                  (`modeling_squeeze_lowrank.py`: LlamaForCausalLM with the listed Linears swapped for
                  nn.Sequential(A, B)) and config.json an `auto_map` to it plus the ranks
                  (`squeeze_low_rank`): `AutoModelForCausalLM.from_pretrained(dir,
                  trust_remote_code=True)` loads it. The config stays model_type "llama", so the
                  rest of the stack (export, facts) sees a Llama; loading such a folder *without*
                  trust_remote_code builds a dense Llama and transformers warns that the factored
                  weights were not used. The app's own load_variant needs no remote code: it swaps
                  the same Linears itself (`adapt_to_config`).

Both must come before quantization / packing steps (recipe.check_order says so).
torch is imported inside the functions: the GUI reads these configs without loading torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .base import StepContext, knob, target_linears
from .gptq import samples_knob, seq_len_knob, sequential_knob, text_knob
from .registry import technique

LOWRANK_KEY = "squeeze_low_rank"          # config.json: {module name: rank}
LOWRANK_FILE = "modeling_squeeze_lowrank.py"
LOWRANK_CLASS = "LowRankLlamaForCausalLM"


# ---------------------------------------------------------------- structured pruning

@dataclass(frozen=True)
class StructuredPrune:
    """Structured pruning: remove whole decoder layers, attention heads and FFN channels (a smaller Llama)."""

    layers: float = knob(0.0, min=0.0, max=0.75, step=0.05, unit="fraction",
                         help="Fraction of decoder layers removed: those that change the hidden state least "
                              "on the calibration text (ShortGPT block influence).")
    linear_heal: bool = knob(False, help="Stand in for each run of removed layers with a linear map, fitted by "
                                         "least squares on the calibration text and folded into the down_proj "
                                         "of the layer before it (ReplaceMe): no training, no extra weights. "
                                         "Helps a prune used as it is; leave off before distill.")
    heads: float = knob(0.0, min=0.0, max=0.75, step=0.05, unit="fraction",
                        help="Fraction of attention heads removed, the same number in every layer, the least "
                             "important on calibration data; grouped-query structure kept.")
    head_unit: str = knob("query", choices=("query", "group"),
                          help="query: drop query heads inside each KV group (KV heads kept); group: drop whole "
                               "KV groups (a KV head with its query heads; also shrinks the KV cache).")
    ffn: float = knob(0.3, min=0.0, max=0.9, step=0.05, unit="fraction",
                      help="Fraction of FFN intermediate channels removed in every layer, the least important "
                           "(RMS activation x weight norm on calibration data, as Wanda scores weights).")
    compensate: bool = knob(False, help="Choose the heads / FFN channels whose loss the rest of the layer can "
                                        "absorb best, and refit o_proj / down_proj on the calibration inputs so the "
                                        "kept units stand in for the removed ones (least squares, one unit at a "
                                        "time: OBS, as ZipLM / SlimGPT). Far better for a prune used as it is, "
                                        "and for heads after distill too; FFN channels distill worse with it.")
    samples: int = samples_knob(32)
    seq_len: int = seq_len_knob(512)
    calib_text: str = text_knob()


def _llama_parts(model):
    from ..calibration import decoder_layers
    layers = decoder_layers(model)
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) or \
                not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise DataError(f"{type(model).__name__}: architecture techniques need a Llama-style decoder "
                            "(self_attn q/k/v/o_proj, mlp gate/up/down_proj)")
        import torch
        if not isinstance(attn.q_proj, torch.nn.Linear) or not isinstance(mlp.down_proj, torch.nn.Linear):
            raise DataError("the model's Linears are already factored or replaced (low_rank?); "
                            "structured_prune must come first")
    return layers


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def keep_only_layers(model, keep: list[int]) -> None:
    """Keep these decoder layers (their indices, in order), dropping the rest: the config and each layer's
    cache index follow, and each kept layer remembers which teacher layer it was (for distill's hidden-state
    loss; this job only, not saved)."""
    import torch
    layers = model.model.layers
    for i in keep:
        if getattr(layers[i], "teacher_layer", None) is None:
            layers[i].teacher_layer = i
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    config = model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    for new_i, layer in enumerate(model.model.layers):  # caches index by layer_idx
        layer.self_attn.layer_idx = new_i
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_i


@technique(StructuredPrune, name="structured_prune", family="architecture")
def structured_prune(model, cfg: StructuredPrune, ctx: StepContext) -> dict:
    import torch

    from .. import calibration

    layers = _llama_parts(model)
    config = model.config
    n_layers = len(layers)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    group = heads // kv
    d = head_dim_of(config)
    inter = config.intermediate_size

    drop_layers = min(_half_up(cfg.layers * n_layers), n_layers - 1)
    if cfg.head_unit == "group":
        drop_groups = min(_half_up(cfg.heads * kv), kv - 1)
        drop_q = 0
    else:
        drop_groups = 0
        drop_q = min(_half_up(cfg.heads * group), group - 1)
    drop_ffn = min(_half_up(cfg.ffn * inter), inter - 1)
    info = {"layers_before": n_layers, "heads_before": heads, "kv_heads_before": kv, "ffn_before": inter}
    if cfg.heads > 0 and not (drop_groups or drop_q):
        ctx.log(f"structured_prune: {cfg.heads:.0%} of heads rounds to none ({kv} KV groups of {group} heads)")

    # 1. importances, all on the model as it comes (progress: statistics to 0.5, block influence to 0.8)
    stats = None
    if drop_groups or drop_q or drop_ffn:
        stats = calibration.calibrate(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text, share=0.5)
    influence = None
    if drop_layers:
        influence = block_influence(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text, start=0.5, span=0.2)

    # 2. whole layers
    keep_layers = list(range(n_layers))
    if drop_layers:
        order = sorted(range(n_layers), key=lambda i: influence[i])
        gone = sorted(order[:drop_layers])
        keep_layers = [i for i in range(n_layers) if i not in gone]
        info["layers_removed"] = gone
        info["block_influence"] = [round(float(b), 5) for b in influence]
        if cfg.linear_heal:
            info["healed_runs"] = linear_heal(model, layers, gone, ctx, cfg.samples, cfg.seq_len, cfg.calib_text,
                                              start=0.7, span=0.1)
    inner = model.model
    keep_only_layers(model, keep_layers)

    # 3. heads and FFN channels: the same count in every layer, which ones per layer
    new_heads = heads - drop_q * kv - drop_groups * group
    new_kv = kv - drop_groups
    new_inter = inter - drop_ffn
    for pos, (orig_i, layer) in enumerate(zip(keep_layers, inner.layers)):
        ctx.check_cancel()
        if stats is None:
            break
        st = stats.layer(orig_i)
        attn, mlp = layer.self_attn, layer.mlp
        if drop_q or drop_groups:
            wo = attn.o_proj.weight.detach().float()
            new_wo = None
            if not cfg.compensate:  # each head's output energy through o_proj
                h = st["self_attn.o_proj"].h
                imp = torch.stack([_output_energy(wo[:, j * d:(j + 1) * d], h[j * d:(j + 1) * d, j * d:(j + 1) * d])
                                   for j in range(heads)])
            else:  # OBS over query heads (or whole KV groups), at most drop_q per group
                unit = group * d if drop_groups else d
                n_units = kv if drop_groups else heads
                gone_u, new_wo = obs_remove(wo, st["self_attn.o_proj"].hessian(),
                                            [torch.arange(u * unit, (u + 1) * unit) for u in range(n_units)],
                                            drop_groups or drop_q * kv,
                                            None if drop_groups else (lambda u: u // group, drop_q))
                imp = torch.ones(n_units)
                imp[gone_u] = 0.0
                if drop_groups:
                    imp = imp.repeat_interleave(group)
            if drop_groups:
                g_imp = imp.view(kv, group).sum(1)
                keep_g = sorted(torch.argsort(g_imp, descending=True)[:new_kv].tolist())
                keep_q = [g * group + k for g in keep_g for k in range(group)]
                keep_kv = keep_g
            else:
                keep_q = []
                for g in range(kv):
                    part = imp[g * group:(g + 1) * group]
                    keep_q += sorted((g * group + k for k in
                                      torch.argsort(part, descending=True)[:group - drop_q].tolist()))
                keep_kv = list(range(kv))
            q_rows = _head_rows(keep_q, d)
            kv_rows = _head_rows(keep_kv, d)
            _keep_rows(attn.q_proj, q_rows)
            _keep_rows(attn.k_proj, kv_rows)
            _keep_rows(attn.v_proj, kv_rows)
            _keep_cols(attn.o_proj, q_rows, None if new_wo is None else new_wo[:, q_rows])
            attn.num_key_value_groups = new_heads // new_kv
            for name, v in (("num_heads", new_heads), ("num_key_value_heads", new_kv)):
                if hasattr(attn, name):
                    setattr(attn, name, v)
        if drop_ffn:
            wd = mlp.down_proj.weight.detach().float()
            new_wd = None
            if cfg.compensate:
                gone_c, new_wd = obs_remove(wd, st["mlp.down_proj"].hessian(), None, drop_ffn)
                keep = sorted(set(range(inter)) - set(gone_c))
            else:
                imp = st["mlp.down_proj"].col_norm() * wd.norm(dim=0)
                keep = sorted(torch.argsort(imp, descending=True, stable=True)[:new_inter].tolist())
            keep = torch.tensor(keep)
            _keep_rows(mlp.gate_proj, keep)
            _keep_rows(mlp.up_proj, keep)
            _keep_cols(mlp.down_proj, keep, None if new_wd is None else new_wd[:, keep])
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = new_inter
        ctx.progress(0.8 + 0.2 * (pos + 1) / len(keep_layers), f"layer {pos + 1}/{len(keep_layers)}")
    config.num_attention_heads = new_heads
    config.num_key_value_heads = new_kv
    config.intermediate_size = new_inter
    config.head_dim = d  # explicit: hidden_size / heads is no longer the head size
    ctx.progress(1.0)
    from ..variant import count_params
    info.update(layers=len(keep_layers), heads=new_heads, kv_heads=new_kv, ffn=new_inter,
                params=count_params(model)[0])
    return info


def _output_energy(w, h):
    """trace(W^T W H): sum over calibration tokens of |W x|^2 for the inputs whose x x^T sum is H."""
    return ((w.T @ w) * h).sum()


def _head_rows(heads, d):
    import torch
    return torch.tensor([j * d + k for j in heads for k in range(d)], dtype=torch.long)


def _keep_rows(lin, idx) -> None:
    import torch
    lin.weight = torch.nn.Parameter(lin.weight.data[idx].clone(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = torch.nn.Parameter(lin.bias.data[idx].clone(), requires_grad=lin.bias.requires_grad)
    lin.out_features = len(idx)


def _keep_cols(lin, idx, new=None) -> None:
    """Keep the input columns idx; new: their refitted values (out, len(idx)) instead of the old ones."""
    import torch
    w = lin.weight.data[:, idx] if new is None else new.to(lin.weight.dtype)
    lin.weight = torch.nn.Parameter(w.clone(), requires_grad=lin.weight.requires_grad)
    lin.in_features = len(idx)


def obs_remove(W, H, units, n_drop: int, per_group=None, damping: float = 0.01):
    """Greedy structured OBS on a Linear's inputs. W: (out, in), H: (in, in) mean x x^T of its inputs.
    units: index tensors of the input blocks that go together (None: every column on its own).
    Each round removes the unit whose removal, after the kept inputs are refit by least squares, adds
    the least output error tr(W_B [H^-1]_BB^-1 W_B^T), and applies that refit to W. per_group:
    (unit -> group, at most this many removed per group). -> (removed unit ids, refitted W (out, in))."""
    import torch
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    H.diagonal().add_(damping * H.diagonal().mean().clamp(min=1e-12))
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    gone: list[int] = []
    if units is None:  # single columns: every cost at once
        alive = torch.ones(W.shape[1], dtype=torch.bool)
        for _ in range(n_drop):
            d = Hinv.diagonal()
            cost = torch.where(alive, (W * W).sum(0) / d.clamp(min=1e-12), torch.full((), torch.inf))
            c = int(cost.argmin())
            W -= W[:, c:c + 1] * (Hinv[c:c + 1, :] / d[c])
            Hinv -= Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / d[c]
            alive[c] = False
            gone.append(c)
        W[:, ~alive] = 0.0  # exactly (the downdates leave ~1e-8 there)
        return gone, W
    taken: dict[int, int] = {}
    for _ in range(n_drop):
        best, best_u = None, None
        for u, idx in enumerate(units):
            if u in gone or (per_group and taken.get(per_group[0](u), 0) >= per_group[1]):
                continue
            cost = float((W[:, idx] @ torch.linalg.solve(Hinv[idx][:, idx], W[:, idx].T)).trace())
            if best is None or cost < best:
                best, best_u = cost, u
        idx = units[best_u]
        inv_bb = torch.linalg.inv(Hinv[idx][:, idx])
        W -= W[:, idx] @ inv_bb @ Hinv[idx, :]
        Hinv -= Hinv[:, idx] @ inv_bb @ Hinv[idx, :]
        gone.append(best_u)
        if per_group:
            taken[per_group[0](best_u)] = taken.get(per_group[0](best_u), 0) + 1
    for u in gone:
        W[:, units[u]] = 0.0
    return gone, W


def block_influence(model, ctx: StepContext, n_samples: int, seq_len: int, calib_text: str = "",
                    start: float = 0.0, span: float = 1.0) -> list[float]:
    """ShortGPT block influence of each decoder layer: 1 - mean cosine similarity between the
    layer's input and output hidden states, over the calibration tokens after BOS (position 0 is
    the attention sink, whose massive activation every layer leaves almost unchanged)."""
    import torch

    from .. import calibration

    if ctx.tokenizer is None:
        raise DataError("calibration needs the model's tokenizer")
    layers = calibration.decoder_layers(model)
    decoder = getattr(model, "model", model)
    ids = calibration.samples(ctx.tokenizer, calibration.text_path(calib_text), n_samples, seq_len)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    inputs: dict[int, torch.Tensor] = {}

    def pre(i):
        def fn(_mod, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return fn

    def post(i):
        def fn(_mod, _args, _kwargs, out):
            y = out[0] if isinstance(out, tuple) else out
            x = inputs.pop(i)
            cos = torch.nn.functional.cosine_similarity(x[:, 1:].float(), y[:, 1:].float(), dim=-1)
            sums[i] += cos.double().sum()
        return fn

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    try:
        with torch.inference_mode():
            batch = 8
            for b in range(0, len(ids), batch):
                ctx.check_cancel()
                chunk = ids[b:b + batch]
                decoder(chunk, use_cache=False)  # the decoder alone: no LM head, no logits to hold
                count += chunk.shape[0] * (chunk.shape[1] - 1)
                ctx.progress(start + span * min(1.0, (b + batch) / len(ids)), "block influence")
    finally:
        for h in handles:
            h.remove()
    return (1.0 - sums / count).tolist()


def _runs(gone: list[int]) -> list[tuple[int, int]]:
    """[3, 12, 13, 14, 17] -> [(3, 3), (12, 14), (17, 17)]: maximal runs of consecutive layers."""
    runs: list[list[int]] = []
    for g in sorted(gone):
        if runs and runs[-1][1] == g - 1:
            runs[-1][1] = g
        else:
            runs.append([g, g])
    return [(a, b) for a, b in runs]


def linear_heal(model, layers, gone: list[int], ctx: StepContext, n_samples: int, seq_len: int,
                calib_text: str = "", damping: float = 0.01, start: float = 0.0, span: float = 1.0) -> list:
    """ReplaceMe (Shopkhoev et al., 2025): for each run a..b of removed layers, find T (hidden x hidden)
    with  Y + M T ≈ H_b, where M is the MLP output of layer a-1, Y the rest of that layer's output
    and H_b what layer b put out in the full model; then down_proj(a-1) <- T^T W, so the pruned model
    computes Y + M T with no new weights. Runs are fitted in order, each on the model with the earlier
    runs already removed and folded (its inputs are what the pruned model will see); the least-squares
    problem is damped toward T = I (plain removal). Position 0 (the attention sink, whose massive
    activation no layer changes) is left out of the fit. Returns the runs healed, as [a, b] pairs."""
    import torch

    from .. import calibration

    decoder = getattr(model, "model", model)
    ids = calibration.samples(ctx.tokenizer, calibration.text_path(calib_text), n_samples, seq_len)
    runs = [(a, b) for a, b in _runs(gone) if a > 0]  # a run from layer 0 has no layer before it
    full = decoder.layers
    batch = 8

    def flat(y):  # (batch, seq, hidden) -> (batch * (seq - 1), hidden), position 0 left out
        y = y[0] if isinstance(y, tuple) else y
        return y.detach()[:, 1:].reshape(-1, y.shape[-1]).double()

    targets: dict[int, list] = {a: [] for a, _ in runs}  # (tokens, hidden) per batch, float32 to halve memory
    hooks = [layers[b].register_forward_hook(
        lambda _m, _i, out, a=a: targets[a].append(flat(out).float())) for a, b in runs]
    try:
        with torch.inference_mode():
            for i in range(0, len(ids), batch):
                ctx.check_cancel()
                decoder(ids[i:i + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    done, removed = [], set()
    try:
        for k, (a, b) in enumerate(runs):
            prev = max(i for i in range(a) if i not in removed)
            cap: dict = {}
            hooks = [layers[prev].mlp.register_forward_hook(lambda _m, _i, out: cap.__setitem__("m", flat(out))),
                     layers[prev].register_forward_hook(lambda _m, _i, out: cap.__setitem__("h", flat(out)))]
            decoder.layers = torch.nn.ModuleList([layers[i] for i in range(prev + 1) if i not in removed])
            d = layers[prev].mlp.down_proj.out_features
            mm = torch.zeros(d, d, dtype=torch.float64)
            mt = torch.zeros(d, d, dtype=torch.float64)
            try:
                with torch.inference_mode():
                    for j, i in enumerate(range(0, len(ids), batch)):
                        ctx.check_cancel()
                        decoder(ids[i:i + batch], use_cache=False)
                        m, h = cap["m"], cap["h"]
                        mm += m.T @ m
                        mt += m.T @ (targets[a][j].double() - (h - m))
            finally:
                for h in hooks:
                    h.remove()
            lam = damping * mm.diagonal().mean()
            eye = torch.eye(d, dtype=torch.float64)
            t = torch.linalg.solve(mm + lam * eye, mt + lam * eye)  # (hidden, hidden)
            w = layers[prev].mlp.down_proj.weight
            with torch.no_grad():
                w.copy_((t.T @ w.double()).to(w.dtype))
            removed |= set(range(a, b + 1))
            done.append([a, b])
            ctx.progress(start + span * (k + 1) / len(runs), "linear stand-ins for removed layers")
    finally:
        decoder.layers = full
    return done


# ---------------------------------------------------------------- low rank

@dataclass(frozen=True)
class LowRank:
    """Low rank: each decoder Linear replaced by two thin factors from a truncated SVD (activation-aware optional)."""

    keep: float = knob(0.8, min=0.05, max=0.95, step=0.05, unit="fraction",
                       help="Fraction of the decoder Linears' parameters kept.")
    allocation: str = knob("loss", choices=("loss", "uniform"),
                           help="loss: ranks differ per Linear, the singular directions kept across the whole "
                                "model are those worth most loss per parameter (truncation error weighted by "
                                "the loss gradient at each output); a Linear that would keep more than its "
                                "break-even rank stays dense. uniform: every Linear keeps the same fraction, "
                                "rank = floor(keep x out x in / (out + in)).")
    activation_aware: bool = knob(True, help="Whiten by the calibration inputs before the SVD (SVD-LLM): the "
                                             "truncation error is measured on what each Linear really sees.")
    damping: float = knob(0.01, min=0.0, max=1.0, step=0.01, unit="× mean diag",
                          help="Added to the diagonal of the calibration x x^T before whitening (stability).")
    sequential: bool = sequential_knob()
    samples: int = samples_knob(32)
    seq_len: int = seq_len_knob(512)
    calib_text: str = text_knob()

    @property
    def uses_loss_gradients(self) -> bool:  # the loss allocation takes a backward pass
        return self.allocation == "loss"


def rank_for(out_f: int, in_f: int, keep: float) -> int:
    """The rank that keeps `keep` of an out x in Linear's parameters; 0 when factoring would not save."""
    r = math.floor(keep * out_f * in_f / (out_f + in_f))
    return r if r >= 1 and r * (out_f + in_f) < out_f * in_f else 0


def factors(w, r: int, h=None, damping: float = 0.01, pick=None):
    """(A: r x in, B: out x r) with B @ A the best rank-r approximation of w: plain SVD, or with h
    (in x in, sum of x x^T) the SVD of w S, S the Cholesky factor of h (h = S S^T), so that
    ||(W - B A) X|| is what is minimised (SVD-LLM). Singular values are split evenly between the factors.
    pick: the indices of the singular directions to keep (default: the r largest)."""
    import torch

    u, s, vh, s_chol = _svd(w, h, damping)
    idx = torch.arange(r) if pick is None else torch.as_tensor(pick, dtype=torch.long)
    root = s[idx].sqrt()
    m = root[:, None] * vh[idx]                                      # (r, in) = sqrt(S_r) V_r^T
    if s_chol is not None:
        m = torch.linalg.solve_triangular(s_chol.T, m.T, upper=True).T  # m @ S^-1
    return m.float(), (u[:, idx] * root).float()


def _svd(w, h=None, damping: float = 0.01):
    """SVD of w (plain) or of w S with h = S S^T (whitened) -> (u, s, vh, S or None), in float64."""
    import torch

    w64 = w.detach().double()
    if h is None:
        u, s, vh = torch.linalg.svd(w64, full_matrices=False)
        return u, s, vh, None
    h64 = h.double()
    diag = h64.diagonal()
    h64 = h64 + torch.eye(len(h64), dtype=h64.dtype) * (damping * diag.mean() + 1e-8 * diag.max())
    s_chol, bad = torch.linalg.cholesky_ex(h64)
    if bad:  # not positive definite even damped: more damping until it is
        for extra in (1e-4, 1e-3, 1e-2, 1e-1):
            s_chol, bad = torch.linalg.cholesky_ex(h64 + torch.eye(len(h64), dtype=h64.dtype) * extra * diag.mean())
            if not bad:
                break
    u, s, vh = torch.linalg.svd(w64 @ s_chol, full_matrices=False)
    return u, s, vh, s_chol


def allocate(costs: dict, shapes: dict, keep: float) -> dict:
    """Global rank allocation. costs: {name: (k,) loss of dropping each singular direction},
    shapes: {name: (out, in)}. Keeps the directions worth most loss per parameter (a direction of
    an out x in Linear costs out + in) until keep x the dense parameters are spent; a Linear whose
    directions would cost more than its dense weight stays dense (None). -> {name: kept indices | None}."""
    import torch

    budget = keep * sum(o * i for o, i in shapes.values())
    cand = [(float(c) / sum(shapes[n]), n, j) for n, cs in costs.items() for j, c in enumerate(cs)]
    cand.sort(key=lambda t: -t[0])
    picked: dict[str, list[int]] = {n: [] for n in costs}
    used = 0.0

    def size(n, r):
        o, i = shapes[n]
        return min(r * (o + i), o * i)

    for n in costs:  # every Linear keeps at least its most valuable direction
        best = int(torch.as_tensor(costs[n]).argmax())
        picked[n].append(best)
        used += size(n, 1)
    for _, n, j in cand:
        if j in picked[n][:1]:
            continue
        r = len(picked[n])
        extra = size(n, r + 1) - size(n, r)
        if used + extra > budget:
            continue  # a cheaper direction elsewhere may still fit
        picked[n].append(j)
        used += extra
    out = {}
    for n, idx in picked.items():
        o, i = shapes[n]
        out[n] = None if len(idx) * (o + i) >= o * i else sorted(idx)
    return out


def factored(lin, a, b):
    """nn.Sequential(A, B) computing B A x (+ the Linear's bias), in the Linear's dtype and device."""
    import torch
    first = torch.nn.Linear(a.shape[1], a.shape[0], bias=False, dtype=lin.weight.dtype, device=lin.weight.device)
    second = torch.nn.Linear(b.shape[1], b.shape[0], bias=lin.bias is not None, dtype=lin.weight.dtype,
                             device=lin.weight.device)
    with torch.no_grad():
        first.weight.copy_(a)
        second.weight.copy_(b)
        if lin.bias is not None:
            second.bias.copy_(lin.bias)
    return torch.nn.Sequential(first, second)


def _swap(model, name: str, module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@technique(LowRank, name="low_rank", family="architecture")
def low_rank(model, cfg: LowRank, ctx: StepContext) -> dict:
    from .. import calibration

    if getattr(model.config, LOWRANK_KEY, None):
        raise DataError("the model is already factored by low_rank; keep one low_rank step")
    linears = dict(target_linears(model))
    plan: dict = {n: rank_for(m.out_features, m.in_features, cfg.keep) or None for n, m in linears.items()}
    stats = None
    if cfg.activation_aware and (cfg.allocation == "loss" or not cfg.sequential):  # sequential gathers its own
        stats = calibration.calibrate(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text, share=0.4)
    layer_of = {n: int(n.split(".layers.", 1)[1].split(".", 1)[0]) for n in linears}

    memo: dict = {}  # the last layer's statistics (read from disk once per layer and pass)

    def stat_of(name):
        if stats is None:
            return None
        i = layer_of[name]
        if i not in memo:
            memo.clear()
            memo[i] = stats.layer(i)
        return memo[i].get(name.split(f".layers.{i}.", 1)[1])

    if cfg.uses_loss_gradients:
        # loss of dropping direction t of W (S): sigma_t^2 * sum_k g2_k u_tk^2, its output error
        # (sigma_t u_t per whitened input) weighted by the loss gradient's second moment at each output
        g2 = calibration.grad_moments(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text)
        costs = {}
        for k, (name, lin) in enumerate(linears.items()):
            ctx.check_cancel()
            st = stat_of(name)
            u, s, _, _ = _svd(lin.weight.data, st.h if st is not None else None, cfg.damping)
            costs[name] = (s ** 2 * (u ** 2 * g2[name].double()[:, None]).sum(0)).float()
            ctx.progress(0.4 + 0.3 * (k + 1) / len(linears), "rank allocation")
        plan = allocate(costs, {n: (m.out_features, m.in_features) for n, m in linears.items()}, cfg.keep)
    ranks: dict[str, int] = {}
    before = after = 0
    err = []
    start = 0.7 if cfg.allocation == "loss" else 0.4

    def factor(name, lin, st, pick_ok: bool) -> None:
        nonlocal before, after
        p = plan.get(name)
        before += lin.weight.numel()
        if p is None:
            after += lin.weight.numel()
            return
        # the picked directions are those of the statistics they were chosen on; sequential
        # statistics change the SVD, so there the same number of leading directions is kept
        r, pick = (p, None) if isinstance(p, int) else (len(p), p if pick_ok else None)
        a, b = factors(lin.weight.data, r, st.h if st is not None else None, cfg.damping, pick)
        if st is not None:  # relative output error on the calibration inputs
            delta = (b @ a - lin.weight.data).double()
            hd = st.h.double()
            err.append(float(((delta @ hd) * delta).sum() / ((lin.weight.data.double() @ hd)
                                                               * lin.weight.data.double()).sum()))
        _swap(model, name, factored(lin, a, b))
        ranks[name] = r
        after += a.numel() + b.numel()

    if cfg.sequential and cfg.activation_aware:
        with ctx.part(start, 1.0):  # each layer whitened by what the already-factored layers before it produce
            calibration.each_layer(model, ctx, cfg.samples, cfg.seq_len, cfg.calib_text,
                                   lambda _i, lins, _st: [factor(n, lin, st, False) for n, (lin, st) in lins.items()],
                                   sequential=True)
    else:
        for k, (name, lin) in enumerate(linears.items()):
            ctx.check_cancel()
            ctx.progress(start + (1 - start) * k / len(linears), name)
            factor(name, lin, stat_of(name), True)
    ctx.progress(1.0)
    if not ranks:
        return {"factored": 0, "keep": cfg.keep, "linear_params_before": before, "linear_params_after": after}
    set_low_rank_config(model.config, ranks)
    info = {"factored": len(ranks), "skipped": len(linears) - len(ranks), "keep": cfg.keep,
            "allocation": cfg.allocation,
            "linear_params_before": before, "linear_params_after": after,
            "kept": round(after / max(before, 1), 4)}
    distinct = sorted(set(ranks.values()))
    if len(distinct) <= 8:
        info["ranks"] = distinct
    else:
        info["rank_range"] = [distinct[0], sorted(ranks.values())[len(ranks) // 2], distinct[-1]]  # min, median, max
    if err:
        info["mean_relative_output_error"] = round(sum(err) / len(err), 5)
    return info


def set_low_rank_config(config, ranks: dict[str, int]) -> None:
    setattr(config, LOWRANK_KEY, dict(ranks))
    auto = dict(getattr(config, "auto_map", None) or {})
    auto["AutoModelForCausalLM"] = f"{LOWRANK_FILE.removesuffix('.py')}.{LOWRANK_CLASS}"
    config.auto_map = auto


def adapt_to_config(model) -> None:
    """Give a model built from a variant's config the structure its weights have (the factored
    Linears of low_rank); a no-op for other configs. Used by load_variant before the weights load."""
    ranks = getattr(model.config, LOWRANK_KEY, None) or {}
    import torch
    for name, r in ranks.items():
        lin = model.get_submodule(name)
        _swap(model, name, factored(lin, torch.empty(r, lin.in_features), torch.empty(lin.out_features, r)))


MODELING = '''"""Written by Squeeze Studio's low_rank technique: a Llama whose listed Linears are factored
into nn.Sequential(A, B) (B @ A approximates the original weight). config.squeeze_low_rank maps each
factored module's name to its rank. Load with
    AutoModelForCausalLM.from_pretrained(this_folder, trust_remote_code=True)
"""
from torch import nn
from transformers import LlamaForCausalLM


class LowRankLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        for name, rank in (getattr(config, "squeeze_low_rank", None) or {}).items():
            parent_name, _, leaf = name.rpartition(".")
            parent = self.get_submodule(parent_name) if parent_name else self
            lin = getattr(parent, leaf)
            setattr(parent, leaf, nn.Sequential(
                nn.Linear(lin.in_features, rank, bias=False, dtype=lin.weight.dtype, device=lin.weight.device),
                nn.Linear(rank, lin.out_features, bias=lin.bias is not None, dtype=lin.weight.dtype,
                          device=lin.weight.device)))
'''


def write_variant_files(config, folder: Path) -> None:
    """Called by save_variant after config.json is written: head_dim stays explicit (a config
    diff that leaves out values equal to the class default would drop head_dim 128, and a missing
    head_dim is recomputed as hidden_size / heads, wrong once heads are pruned; transformers 4.57
    writes it, this keeps it so); a low_rank model gets its modeling file."""
    import json
    folder = Path(folder)
    cfg_file = folder / "config.json"
    data = json.loads(cfg_file.read_text())
    hd = getattr(config, "head_dim", None)
    if hd and data.get("head_dim") != hd:
        data["head_dim"] = hd
        cfg_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if getattr(config, LOWRANK_KEY, None):
        (folder / LOWRANK_FILE).write_text(MODELING)
