"""KV-cache techniques: they change no weight, only what the model keeps of its past while it
reads and generates.

* ``kv_quant`` — a KIVI-style quantized cache: keys quantized per channel (a scale per channel for
  each group of ``group_size`` tokens), values per token (a scale per token for each group of
  ``group_size`` channels), 8 or 4 bits (4-bit codes stored two per byte), asymmetric min/max with
  fp16 scale and minimum; the most recent ``residual`` tokens stay in float.
* ``kv_window`` — StreamingLLM: the first ``sinks`` tokens (attention sinks) plus the ``window``
  most recent tokens; everything in between is evicted, so the cache stops growing.

What is reused from transformers (4.57, ``transformers.cache_utils``) and what is written here:

* ``Cache`` (the per-layer container the model calls ``update`` / ``get_seq_length`` /
  ``get_mask_sizes`` on) is used as it is; our caches only hand it their layers.
* ``KIVILayer`` subclasses ``QuantizedLayer`` (which is a ``DynamicLayer``) and keeps its fields
  (``nbits``, ``axis_key``, ``axis_value``, ``q_group_size``, ``residual_length``,
  ``cumulative_length``), its ``get_seq_length`` and its mask sizes. Its quantize / dequantize are
  written here in plain torch (the quanto / hqq backends transformers calls are not installed),
  and so is ``update``: transformers' version quantizes the whole prompt at once (no float
  residual after a prefill) and re-quantizes the entire cache, dequantized, each time the
  residual fills, so old tokens are rounded again and again and a flush costs the whole sequence.
  Here the cache is append-only: each token is quantized exactly once, when it leaves the residual,
  in whole groups of ``group_size`` tokens (the keys' groups run along the sequence).
* ``SinkWindowLayer`` subclasses ``DynamicLayer`` (initialisation, reorder / batch helpers); the
  eviction, the absolute positions of the kept tokens, and the attention mask are written here
  (transformers' ``SinkCache`` is gone from 4.57 and now lives on the hub). Kept keys carry their
  original rotary positions (no re-indexing inside the cache as StreamingLLM does to run beyond
  the trained length): the model's own position range bounds the text length.

The saved variant carries the technique as a runtime entry in squeeze.json (``kv_quant:{json}``);
``core.variant.load_variant`` calls :func:`attach_from`, and :func:`make_cache` gives the cache to
use with a model (a plain ``DynamicCache`` for a model without a KV technique).
:func:`forward` runs ids through the model with a cache, adding the exact StreamingLLM mask when
several tokens arrive at once (both caches: several tokens read at once see exactly what each
would see read one by one); :func:`generate` is ``model.generate`` with the cache (exact for a
prompt longer than the window); :func:`chunked_logits` is how evaluation feeds a window.
(torch is imported inside the functions: the GUI reads these configs without loading torch.)
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from types import SimpleNamespace

from ..errors import RecipeError
from .base import StepContext, knob, to_dict
from .registry import technique

ATTR = "squeeze_kv_cache"   # model attribute: (name, config) of the KV technique attached
EVAL_CHUNK = 128            # tokens fed per forward when evaluating with a cache


@dataclass(frozen=True)
class KVQuant:
    """Quantized KV cache (KIVI): keys per channel, values per token, the newest tokens kept in float."""

    bits: int = knob(8, choices=(8, 4), unit="bits",
                     help="Bits per cached key/value: 8 is near-lossless, 4 keeps about a sixth of the fp32 cache.")
    group_size: int = knob(32, choices=(16, 32, 64, 128), unit="elements",
                           help="Keys: tokens sharing one scale per channel; values: channels sharing one scale "
                                "per token (at most the head size).")
    residual: int = knob(64, min=0, max=512, step=16, unit="tokens",
                         help="The most recent tokens kept in float until a whole group of older ones is quantized.")


@dataclass(frozen=True)
class KVWindow:
    """Attention sinks + recent window (StreamingLLM): the KV cache stays the same size however long the text."""

    sinks: int = knob(4, min=0, max=64, step=1, unit="tokens",
                      help="First tokens always kept: attention piles onto them, dropping them breaks the model.")
    window: int = knob(256, min=16, max=8192, step=16, unit="tokens", scale="log",
                       help="Most recent tokens kept; older ones (after the sinks) are evicted.")


KINDS = {"kv_quant": KVQuant, "kv_window": KVWindow}


def _record(model, name: str, cfg, ctx: StepContext) -> dict:
    earlier = [e for e in ctx.runtime if e.split(":", 1)[0] in KINDS]
    if earlier:
        raise RecipeError(f"{name} cannot follow {earlier[0].split(':', 1)[0]}: a recipe holds one KV-cache "
                          f"technique", field="technique")
    entry = f"{name}:{json.dumps(to_dict(cfg), sort_keys=True)}"
    ctx.runtime.append(entry)
    attach_from(model, entry)
    return {"runtime": entry, "kv_bytes_per_token_estimate": estimate_bytes_per_token(model)}


@technique(KVQuant, name="kv_quant", family="kv_cache", needs_float=False)
def kv_quant(model, cfg: KVQuant, ctx: StepContext) -> dict:
    return _record(model, "kv_quant", cfg, ctx)


@technique(KVWindow, name="kv_window", family="kv_cache", needs_float=False)
def kv_window(model, cfg: KVWindow, ctx: StepContext) -> dict:
    return _record(model, "kv_window", cfg, ctx)


# ---------------------------------------------------------------- attach / make

def attach_from(model, entry: str) -> None:
    """Attach the runtime entry "kv_quant:{json}" / "kv_window:{json}" to the model."""
    name, _, raw = entry.partition(":")
    if name not in KINDS:
        raise ValueError(f"not a KV-cache runtime entry: {entry!r}")
    cfg = KINDS[name](**json.loads(raw or "{}"))
    object.__setattr__(model, ATTR, (name, cfg))  # a plain attribute, not a submodule


def kv_technique(model):
    """(name, config) of the model's KV technique, or None for the full cache."""
    return getattr(model, ATTR, None)


def _geometry(model) -> tuple[int, int, int]:
    c = model.config.get_text_config(decoder=True)
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, kv_heads, head_dim


def make_cache(model):
    """The cache object to use with this model: quantized, windowed, or a plain DynamicCache."""
    from transformers import DynamicCache

    kv = kv_technique(model)
    if kv is None:
        return DynamicCache()
    name, cfg = kv
    layers, _, head_dim = _geometry(model)
    if name == "kv_quant":
        return classes().KVQuantCache(layers, cfg.bits, cfg.group_size, cfg.residual, head_dim)
    return classes().KVWindowCache(layers, cfg.sinks, cfg.window)


def cache_bytes(cache) -> int:
    """Bytes the cache holds now: codes, scales and float residual (quantized), kept keys and values."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
        elif layer.is_initialized and layer.keys is not None:
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total


def estimate_bytes_per_token(model, tokens: int = 2048) -> float:
    """Bytes per token the attached cache holds after `tokens` tokens (fp32 activations), on paper."""
    layers, kv_heads, head_dim = _geometry(model)
    per_el = 4.0
    kv = kv_technique(model)
    if kv is None:
        return 2 * layers * kv_heads * head_dim * per_el
    name, cfg = kv
    if name == "kv_window":
        kept = min(tokens, cfg.sinks + cfg.window)
        return 2 * layers * kv_heads * head_dim * per_el * kept / tokens
    g = cfg.group_size
    gv = min(g, head_dim)
    quantized = max(0, (tokens - cfg.residual) // g * g)
    code = cfg.bits / 8
    k = quantized * (code + 4 / g) + (tokens - quantized) * per_el            # fp16 scale + min per group
    v = quantized * (code + 4 / gv) + (tokens - quantized) * per_el
    return layers * kv_heads * head_dim * (k + v) / tokens


# ---------------------------------------------------------------- running with a cache

def forward(model, ids, cache):
    """model(ids) with the cache; the windowed cache supplies its exact mask for multi-token inputs."""
    mask = cache.chunk_mask(ids.shape[1], model) if hasattr(cache, "chunk_mask") else None
    return model(ids, past_key_values=cache, use_cache=True, attention_mask=mask)


def generate(model, ids, **kwargs):
    """model.generate with the model's cache. The prompt (all but its last token) is read first
    through :func:`forward`, so a prompt longer than the window gets the exact StreamingLLM mask;
    generate then goes on from the filled cache."""
    import torch

    cache = make_cache(model)
    if ids.shape[1] > 1:
        with torch.inference_mode():
            forward(model, ids[:, :-1], cache)
    kwargs.setdefault("attention_mask", torch.ones_like(ids))
    return model.generate(ids, past_key_values=cache, **kwargs), cache


def chunked_logits(model, ids, chunk: int = EVAL_CHUNK):
    """Logits (T, V) of one window fed `chunk` tokens at a time through the model's cache: each
    chunk sees the earlier ones only through the quantized / windowed cache, and with the caches'
    chunk masks every token sees what it would see in token-by-token decoding. -> (logits, cache)."""
    import torch

    cache = make_cache(model)
    parts = []
    for s in range(0, ids.shape[1], chunk):
        parts.append(forward(model, ids[:, s:s + chunk], cache).logits[0].float())
    return torch.cat(parts), cache


# ---------------------------------------------------------------- quantization (plain torch)

def _quantize_last(x, bits: int, g: int) -> dict:
    """Asymmetric min/max quantization of groups of `g` along the last dim (padded to a multiple of g).
    Scale and minimum are fp16; the codes are computed against the rounded fp16 values (the minimum
    rounded down), so rounding them costs no clipping. 4-bit codes are packed two per byte."""
    import torch

    n = x.shape[-1]
    pad = (-n) % g
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)  # repeat the last: no range change
    xg = x.float().reshape(*x.shape[:-1], -1, g)
    levels = 2 ** bits - 1
    mn = xg.amin(-1, keepdim=True)
    mx = xg.amax(-1, keepdim=True)
    mn16 = mn.half()
    mn16 = torch.where(mn16.float() > mn, torch.nextafter(mn16, torch.tensor(float("-inf"), dtype=torch.half)), mn16)
    scale = ((mx - mn16.float()) / levels).clamp(min=1e-8)
    s16 = scale.half()
    s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.tensor(float("inf"), dtype=torch.half)), s16)
    q = ((xg - mn16.float()) / s16.float()).round_().clamp_(0, levels).to(torch.uint8)
    q = q.reshape(*x.shape[:-1], -1)
    if bits == 4:
        if q.shape[-1] % 2:
            q = torch.nn.functional.pad(q, (0, 1))
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return {"codes": q, "scale": s16.squeeze(-1), "min": mn16.squeeze(-1), "n": n}


def _dequantize_last(qt: dict, bits: int, g: int):
    import torch

    q = qt["codes"]
    if bits == 4:
        q = torch.stack([q & 15, q >> 4], dim=-1).reshape(*q.shape[:-1], -1)
    scale, mn = qt["scale"].float(), qt["min"].float()
    ng = scale.shape[-1]
    q = q[..., :ng * g].reshape(*q.shape[:-1], ng, g).float()
    x = q * scale.unsqueeze(-1) + mn.unsqueeze(-1)
    return x.reshape(*x.shape[:-2], ng * g)[..., :qt["n"]]


def _qt_bytes(qt: dict | None) -> int:
    if qt is None:
        return 0
    return sum(qt[k].numel() * qt[k].element_size() for k in ("codes", "scale", "min"))


def _cat_qt(a: dict | None, b: dict, dim: int) -> dict:
    import torch

    if a is None:
        return b
    out = {k: torch.cat([a[k], b[k]], dim=dim) for k in ("codes", "scale", "min")}
    out["n"] = a["n"] + b["n"] if dim == -1 else b["n"]   # -1: along the grouped dim (keys' tokens)
    return out


@functools.cache
def classes():
    """The cache classes, defined on first use (transformers is imported only when a cache is made):
    a namespace with KIVILayer, SinkWindowLayer, KVQuantCache, KVWindowCache."""
    import torch
    from transformers.cache_utils import Cache, DynamicLayer, QuantizedLayer

    class _KIVILayer(QuantizedLayer):
        """KIVI on transformers' QuantizedLayer: keys per channel (axis_key=-2: groups of tokens),
        values per token (axis_value=-1: groups of channels); append-only, float residual."""

        def __init__(self, nbits: int, q_group_size: int, residual_length: int, head_dim: int):
            super().__init__(nbits=nbits, axis_key=-2, axis_value=-1, q_group_size=q_group_size,
                             residual_length=residual_length)
            self.value_group = min(q_group_size, head_dim)
            self._qk = self._qv = None   # quantized keys (stored transposed: B, H, D, T) and values
            self.exact_chunk = False      # set by KVQuantCache.chunk_mask for the next update only

        def lazy_initialization(self, key_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            shape = (*key_states.shape[:-2], 0, key_states.shape[-1])
            self.keys = key_states.new_zeros(shape)
            self.values = key_states.new_zeros(shape)
            self.is_initialized = True

        def _quantize(self, tensor, axis):
            if axis == -2:  # keys: a scale per channel for each group of tokens
                return _quantize_last(tensor.transpose(-1, -2), self.nbits, self.q_group_size)
            return _quantize_last(tensor, self.nbits, self.value_group)

        def _dequantize(self, q_tensor, axis=-1):
            if axis == -2:
                return _dequantize_last(q_tensor, self.nbits, self.q_group_size).transpose(-1, -2)
            return _dequantize_last(q_tensor, self.nbits, self.value_group)

        def update(self, key_states, value_states, cache_kwargs=None):
            if not self.is_initialized:
                self.lazy_initialization(key_states)
            self.cumulative_length += key_states.shape[-2]
            exact, self.exact_chunk = self.exact_chunk, False
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
            if self._qk is not None:
                k_all = torch.cat([self._dequantize(self._qk, -2).to(keys.dtype), keys], dim=-2)
                v_all = torch.cat([self._dequantize(self._qv, -1).to(values.dtype), values], dim=-2)
            else:
                k_all, v_all = keys, values
            g = self.q_group_size
            flush = (keys.shape[-2] - self.residual_length) // g * g
            if flush > 0:  # the oldest whole groups leave the float residual, quantized once
                qk, qv = self._quantize(keys[..., :flush, :], -2), self._quantize(values[..., :flush, :], -1)
                if exact:
                    # several tokens at once: the later ones would have seen these groups quantized
                    # had they come one by one; their quantized copies go after, chosen by the mask
                    # of KVQuantCache.chunk_mask (without that mask, as in a plain model call, the
                    # new tokens see each other in float)
                    k_all = torch.cat([k_all, self._dequantize(qk, -2).to(keys.dtype)], dim=-2)
                    v_all = torch.cat([v_all, self._dequantize(qv, -1).to(values.dtype)], dim=-2)
                self._qk, self._qv = _cat_qt(self._qk, qk, -1), _cat_qt(self._qv, qv, -2)
                keys, values = keys[..., flush:, :], values[..., flush:, :]
            self.keys, self.values = keys.contiguous(), values.contiguous()
            return k_all, v_all

        def quantized_tokens(self) -> int:
            return 0 if self._qv is None else self._qv["codes"].shape[-2]

        def nbytes(self) -> int:
            f = 0 if self.keys is None else (self.keys.numel() + self.values.numel()) * self.keys.element_size()
            return f + _qt_bytes(self._qk) + _qt_bytes(self._qv)

        def crop(self, max_length: int) -> None:
            raise NotImplementedError("a quantized KV cache cannot be cropped")

    class _SinkWindowLayer(DynamicLayer):
        """StreamingLLM: keeps the first `sinks` and the last `window` tokens, with their positions."""

        def __init__(self, sinks: int, window: int):
            super().__init__()
            self.sinks, self.window = sinks, window
            self.cumulative_length = 0
            self.positions = torch.zeros(0, dtype=torch.long)

        def update(self, key_states, value_states, cache_kwargs=None):
            if not self.is_initialized:
                self.lazy_initialization(key_states)
            q = key_states.shape[-2]
            keys = torch.cat([self.keys, key_states], dim=-2) if self.keys.dim() == 4 else key_states
            values = torch.cat([self.values, value_states], dim=-2) if self.values.dim() == 4 else value_states
            pos = torch.cat([self.positions, torch.arange(self.cumulative_length, self.cumulative_length + q)])
            self.cumulative_length += q
            keep = (pos < self.sinks) | (pos >= self.cumulative_length - self.window)
            self.keys, self.values = keys[..., keep, :].contiguous(), values[..., keep, :].contiguous()
            self.positions = pos[keep]
            return keys, values

        def stored(self) -> int:
            return int(self.positions.numel())

        def get_seq_length(self) -> int:
            return self.cumulative_length   # positions of new tokens continue from here

        def get_mask_sizes(self, cache_position):
            q = cache_position.shape[0]
            return self.stored() + q, self.cumulative_length - self.stored()

        def get_max_cache_shape(self) -> int:
            return self.sinks + self.window

        def crop(self, max_length: int) -> None:
            raise NotImplementedError("a windowed KV cache cannot be cropped")

    class _KVQuantCache(Cache):
        """A Cache of KIVI layers (what transformers' QuantizedCache builds, minus its backends)."""

        def __init__(self, num_layers: int, nbits: int, q_group_size: int, residual_length: int, head_dim: int):
            super().__init__(layers=[_KIVILayer(nbits, q_group_size, residual_length, head_dim)
                                     for _ in range(num_layers)])

        def chunk_mask(self, q_len: int, model):
            """The mask that makes q_len tokens read at once see what each would see one by one:
            token p sees the first Q(p) = floor((p - residual) / group) * group tokens quantized and
            the rest in float. None where the plain causal mask is exact (one token, or no group
            quantized within these tokens)."""
            layer = self.layers[0]
            n0, q0 = layer.cumulative_length, layer.quantized_tokens()
            g, r = layer.q_group_size, layer.residual_length
            flush = max(0, (n0 - q0 + q_len - r) // g * g)
            if q_len == 1 or flush == 0:
                return None
            p = torch.arange(n0, n0 + q_len)[:, None]
            qp = (p - r).clamp(min=0) // g * g                    # tokens quantized when p comes
            t_float = torch.arange(q0, n0 + q_len)[None, :]       # residual + the new tokens, float
            t_quant = torch.arange(q0, q0 + flush)[None, :]       # their quantized copies
            allowed = torch.cat([torch.ones(q_len, q0, dtype=torch.bool),
                                 (t_float >= qp) & (t_float <= p), t_quant < qp], dim=1)
            for layer in self.layers:
                layer.exact_chunk = True   # the next update returns the quantized copies this mask expects
            return _as_mask(allowed, model)

    class _KVWindowCache(Cache):
        """A Cache of attention-sink + recent-window layers."""

        def __init__(self, num_layers: int, sinks: int, window: int):
            super().__init__(layers=[_SinkWindowLayer(sinks, window) for _ in range(num_layers)])
            self.sinks, self.window = sinks, window

        def chunk_mask(self, q_len: int, model):
            """The exact mask for q_len new tokens: token p sees the sinks and positions p-window..p.
            None where the plain causal mask is already exact (one token, or nothing evicted yet)."""
            layer = self.layers[0]
            start = layer.cumulative_length
            if q_len == 1 or start + q_len <= self.sinks + self.window + 1:
                return None
            kv_pos = torch.cat([layer.positions, torch.arange(start, start + q_len)])
            q_pos = torch.arange(start, start + q_len)[:, None]
            allowed = (kv_pos[None, :] <= q_pos) & ((kv_pos[None, :] < self.sinks) | (kv_pos[None, :] >= q_pos - self.window))
            return _as_mask(allowed, model)

    def _as_mask(allowed, model):
        """(q, kv) booleans -> the 4D mask the model's attention takes (sdpa: bool; eager: additive)."""
        allowed = allowed[None, None]
        if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
            return allowed
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)

    return SimpleNamespace(KIVILayer=_KIVILayer, SinkWindowLayer=_SinkWindowLayer,
                           KVQuantCache=_KVQuantCache, KVWindowCache=_KVWindowCache)
