"""Calibration: text -> token samples -> per-layer input statistics of every decoder Linear,
computed one decoder layer at a time and cached on disk.

The statistics are those of the model as the step receives it, run in float (not of a model
being quantized layer by layer): they do not depend on any slider of the technique that uses
them, so a sweep of group sizes or sparsities reuses one calibration. They are keyed by
(state_key, text digest, samples, seq len) under cache_dir()/calib/.

Per Linear input (Linears fed the same tensor, e.g. q/k/v, share one entry):
    h      (in, in)  sum over tokens of x x^T   (the GPTQ/SparseGPT Hessian is 2 h / n)
    n      tokens summed
    x0     (samples, in)  the inputs at position 0 (BOS: the attention sink; its massive
           activations dominate h, so techniques may re-weight it: h - (1 - w) x0^T x0)
    absmean (in,)  mean |x| over tokens (AWQ)
    absmax  (in,)  max |x| over positions > 0; position 0 is in x0 (SmoothQuant)
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import evaluate as ev
from . import paths
from .errors import DataError

VERSION = 2  # bump when what is cached changes


def text_path(calib_text: str, default: Path | None = None) -> Path:
    """The text a calib_text field names; empty: `default`, else the shipped calibration slice."""
    return Path(calib_text).expanduser() if calib_text else (default or paths.default_calib_text())


def samples(tokenizer, text: Path, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(n, seq_len) token ids: random windows of the text, each after BOS (as evaluation windows are)."""
    raw = ev.read_text(text)
    ids = tokenizer(raw, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if ev.adds_bos(tokenizer) else None
    body = seq_len - (bos is not None)
    if len(ids) < body + 1:
        raise DataError(f"the calibration text {text.name} has {len(ids)} tokens, fewer than one sample of "
                        f"{seq_len}: use a longer text or a shorter sequence length")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randrange(0, len(ids) - body + 1)
        rows.append(([bos] if bos is not None else []) + ids[i:i + body])
    return torch.tensor(rows)


@dataclass
class Stat:
    h: torch.Tensor        # (in, in) sum of x x^T
    n: int
    x0: torch.Tensor       # (samples, in) position-0 inputs
    absmean: torch.Tensor  # (in,)
    absmax: torch.Tensor   # (in,) over positions > 0

    def hessian(self, bos_weight: float = 1.0) -> torch.Tensor:
        """Mean x x^T with the position-0 tokens counted bos_weight times (1 = as they are)."""
        h = self.h
        if bos_weight != 1.0:
            h = h - (1.0 - bos_weight) * (self.x0.T @ self.x0)
        return h / self.n

    def col_norm(self) -> torch.Tensor:
        """(in,) root mean square of each input channel (Wanda's ||X_j||, up to a constant)."""
        return (self.h.diagonal().clamp(min=0) / self.n).sqrt()


class Stats:
    """The cached statistics of one calibration: stats.layer(i) -> {linear name: Stat}."""

    def __init__(self, folder: Path, meta: dict):
        self.folder = folder
        self.meta = meta
        self.n_layers = meta["layers"]

    def layer(self, i: int) -> dict[str, Stat]:
        raw = torch.load(self.folder / f"layer{i:03d}.pt", weights_only=True)
        out = {name: Stat(**d) for name, d in raw["stats"].items()}
        for alias, name in raw["alias"].items():  # k_proj -> q_proj's entry etc.
            out[alias] = out[name]
        return out


def layers_prefix(model, layers) -> str:
    """The layer list's module name ("model.layers"): full Linear names are f"{prefix}.{i}.{short}"."""
    return next(n for n, m in model.named_modules() if m is layers)


def decoder_layers(model):
    """The decoder's layer list (Llama-style models: model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise DataError(f"{type(model).__name__} has no decoder layer list; calibrated techniques need "
                        "a Llama-style model")
    return layers


def cache_key(state_key: str, text: Path, n: int, seq_len: int) -> str:
    raw = json.dumps([VERSION, state_key, ev.text_digest(text), n, seq_len])
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def calibrate(model, ctx, n_samples: int, seq_len: int, calib_text: str = "", share: float = 0.5) -> Stats:
    """Statistics for every decoder layer, from the cache or computed (progress 0 -> share of the step).

    One decoder layer at a time: the calibration hidden states (samples x seq x hidden) go
    through layer i while hooks gather its Linear inputs, then become the inputs of layer i + 1;
    peak memory is the model plus those hidden states. Written to a .tmp folder renamed when
    complete, so a cancel or a crash leaves nothing behind.
    """
    text = text_path(calib_text)
    key = cache_key(ctx.state_key or _weights_digest(model), text, n_samples, seq_len)
    folder = paths.cache_dir() / "calib" / key
    meta_file = folder / "meta.json"
    if meta_file.is_file():
        ctx.log(f"calibration statistics from the cache ({key})")
        ctx.progress(share, "calibration (cached)")
        return Stats(folder, json.loads(meta_file.read_text()))
    if ctx.tokenizer is None:
        raise DataError("calibration needs the model's tokenizer")
    ids = samples(ctx.tokenizer, text, n_samples, seq_len)
    tmp = folder.with_name(key + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _compute(model, ids, tmp, ctx, share)
        meta.update(text=str(text), samples=n_samples, seq_len=seq_len, state_key=ctx.state_key)
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Stats(folder, meta)


class _Stop(Exception):
    pass


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def layer0_inputs(model, ids: torch.Tensor, batch: int = 8) -> tuple[list, list]:
    """The first decoder layer's input per batch of `ids`, (batch, seq, hidden) each, and the keyword arguments
    every layer gets (position embeddings, mask); the model stops there."""
    hidden, kwargs = [], []

    def catch(_mod, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values")})
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for b in range(0, len(ids), batch):
            try:
                model(ids[b:b + batch], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


@torch.no_grad()
def _walk(model, ids: torch.Tensor, ctx, sequential: bool, batch: int = 8):
    """Yields (i, {linear name in layer: Stat}) for each decoder layer, in order.

    Not sequential: one pass per layer gathers its Linear inputs and moves the hidden states on.
    Sequential: the caller changes layer i after it is yielded; the hidden states then go
    through the changed layer, so layer i + 1 is calibrated on what the compressed model feeds it.
    """
    layers = decoder_layers(model)
    hidden, kwargs = layer0_inputs(model, ids, batch)
    # layer by layer: gather the Linear inputs, then move the hidden states on
    for i, layer in enumerate(layers):
        ctx.check_cancel()
        stats, alias, seen = {}, {}, {}
        linears = [(n, m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]

        def hook(name):
            def fn(_mod, args):
                x = args[0]
                for first, y in seen.items():  # the very tensor an earlier Linear got: share its entry
                    if y is x:
                        alias[name] = first
                        return
                seen[name] = x  # held until the batch ends, so identity is meaningful
                _accumulate(stats, name, x)
            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears]
        try:
            for b in range(len(hidden)):
                seen.clear()
                y = _out(layer(hidden[b], **kwargs[b]))
                if not sequential:
                    hidden[b] = y
                ctx.check_cancel()
        finally:
            for h in handles:
                h.remove()
        out = {name: Stat(h=s["h"], n=s["n"], x0=torch.cat(s["x0"]), absmean=s["abssum"] / s["n"],
                          absmax=s["absmax"]) for name, s in stats.items()}
        out.update({a: out[f] for a, f in alias.items() if f in out})
        yield i, out
        if sequential:
            for b in range(len(hidden)):
                hidden[b] = _out(layer(hidden[b], **kwargs[b]))


def _compute(model, ids: torch.Tensor, out: Path, ctx, share: float) -> dict:
    layers = decoder_layers(model)
    for i, st in _walk(model, ids, ctx, sequential=False):
        first = {}  # one saved entry per distinct Stat, the others as aliases
        for name, s in st.items():
            first.setdefault(id(s), name)
        final = {first[id(s)]: vars(s) for s in st.values()}
        alias = {name: first[id(s)] for name, s in st.items() if first[id(s)] != name}
        torch.save({"stats": final, "alias": alias}, out / f"layer{i:03d}.pt")
        ctx.progress(share * (i + 1) / len(layers), f"calibration: layer {i + 1}/{len(layers)}")
    return {"layers": len(layers), "version": VERSION}


def each_layer(model, ctx, n_samples: int, seq_len: int, calib_text: str, fn, sequential: bool = False,
               share: float = 0.5) -> None:
    """Calls fn(i, {full linear name: (module, Stat)}, {name in layer: Stat}) for each decoder layer,
    with progress and cancel between Linears' layers.

    Not sequential: statistics of the model as it comes (cached; a sweep reuses them), then the
    layers one by one. Sequential: layer i's statistics are gathered after layers 0..i-1 were
    changed by fn (as GPTQ and SparseGPT do), so later layers correct the earlier ones' error;
    they depend on the technique's settings, so nothing is cached and each run pays a forward pass.
    """
    layers = decoder_layers(model)
    prefix = layers_prefix(model, layers)

    def call(i, st):
        ctx.check_cancel()
        lin = {f"{prefix}.{i}.{n}": (m, st[n]) for n, m in layers[i].named_modules()
               if isinstance(m, torch.nn.Linear) and n in st}
        fn(i, lin, st)

    if not sequential:
        stats = calibrate(model, ctx, n_samples, seq_len, calib_text, share)
        for i in range(len(layers)):
            call(i, stats.layer(i))
            ctx.progress(share + (1 - share) * (i + 1) / len(layers), f"layer {i + 1}/{len(layers)}")
        return
    if ctx.tokenizer is None:
        raise DataError("calibration needs the model's tokenizer")
    ids = samples(ctx.tokenizer, text_path(calib_text), n_samples, seq_len)
    for i, st in _walk(model, ids, ctx, sequential=True):
        call(i, st)
        ctx.progress((i + 1) / len(layers), f"layer {i + 1}/{len(layers)} (sequential)")


def _accumulate(stats: dict, name: str, x: torch.Tensor) -> None:
    x = x.float()
    x0 = x[:, 0, :]                      # (b, in): position 0 of each sample
    flat = x.reshape(-1, x.shape[-1])    # (b * seq, in)
    s = stats.get(name)
    if s is None:
        d = x.shape[-1]
        s = stats[name] = {"h": torch.zeros(d, d), "n": 0, "x0": [], "abssum": torch.zeros(d),
                           "absmax": torch.zeros(d)}
    s["h"].addmm_(flat.T, flat)
    s["n"] += flat.shape[0]
    s["x0"].append(x0.clone())
    s["abssum"] += flat.abs().sum(0)
    if x.shape[1] > 1:
        s["absmax"] = torch.maximum(s["absmax"], x[:, 1:].abs().amax((0, 1)))


def _weights_digest(model) -> str:
    """A state key for callers without one (tests, scripts): a digest of a few weights."""
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        flat = p.detach().float().reshape(-1)
        h.update(flat[::max(1, flat.numel() // 4096)].numpy().tobytes())
        h.update(flat.abs().sum().numpy().tobytes())
    return h.hexdigest()[:16]


GRAD_WINDOWS = 8  # calibration windows grad_moments reads at most: a ranking, not a statistic to refine


def grad_moments(model, ctx, n_samples: int, seq_len: int, calib_text: str = "") -> dict:
    """{decoder Linear name: (out,) sum over calibration tokens of (d loss / d output)^2}, the
    diagonal Fisher of each Linear's output: an error e added to that output costs about
    1/2 * sum(g2 * e^2) of loss. One backward pass per 2 windows, over the first GRAD_WINDOWS of
    n_samples; nothing cached (cheap)."""
    from .techniques.base import target_linears

    if ctx.tokenizer is None:
        raise DataError("calibration needs the model's tokenizer")
    ids = samples(ctx.tokenizer, text_path(calib_text), min(n_samples, GRAD_WINDOWS), seq_len)
    acc: dict = {}

    def keep(name):
        def fn(_m, _i, out):
            if out.requires_grad:
                out.register_hook(lambda g: acc.__setitem__(name, acc.get(name, 0) + (g.float() ** 2).sum((0, 1))))
        return fn

    needs = {p: p.requires_grad for p in model.parameters()}
    hooks = [m.register_forward_hook(keep(n)) for n, m in target_linears(model)]
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
    try:
        for p in needs:
            p.requires_grad_(False)
        with torch.enable_grad():
            for b in range(0, len(ids), 2):  # 2 windows at a time: the logits are (2, seq, vocab)
                ctx.check_cancel()
                x = ids[b:b + 2]
                model(x, labels=x, use_cache=False).loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p, r in needs.items():
            p.requires_grad_(r)
    return acc
