"""Measurements: perplexity (the protocol of ../shared/data/README.md), size, parameters,
prefill/decode speed, peak RSS.

Perplexity protocol: normalise line ends to \\n, tokenize the whole text once without special
tokens, keep the first `max_tokens` tokens, score non-overlapping windows of `context` tokens.
If the tokenizer starts a text with BOS, every window gets BOS in front as unscored context and
all its tokens are scored; otherwise a window's first token is context and the rest are scored.
"""
from __future__ import annotations

import hashlib
import math
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from . import paths
from .errors import DataError


@dataclass(frozen=True)
class EvalSettings:
    text: str | None = None       # evaluation text file; None = the shipped slice
    max_tokens: int = 4096
    context: int = 512
    prompt_tokens: int = 128      # decode benchmark: prompt length ...
    new_tokens: int = 32          # ... greedy tokens generated with the KV cache
    repeats: int = 3              # median of this many timed runs, after one warm-up

    def text_path(self) -> Path:
        return Path(self.text).expanduser() if self.text else paths.default_eval_text()

    def key(self) -> str:
        """Identifies the measurement conditions: same key, comparable numbers."""
        try:
            h = text_digest(self.text_path())
        except DataError:
            h = "unreadable"  # the job then fails with the reason; the key only has to exist
        return (f"{h}:{self.max_tokens}:{self.context}:"
                f"{self.prompt_tokens}:{self.new_tokens}:{self.repeats}")

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> "EvalSettings":
        """One line for settings no evaluation can run with, before any model loads (or a job starts, which
        would leave a failed run): numbers out of range, a text file that cannot be read."""
        for k in ("max_tokens", "context", "prompt_tokens", "new_tokens", "repeats"):
            least = 2 if k == "context" else 1  # a window scores its tokens after the first
            if getattr(self, k) < least:
                raise DataError(f"{k.replace('_', ' ')} must be at least {least}; got {getattr(self, k)}")
        check_window(self.max_tokens, self.context)
        p = self.text_path()
        if not read_text(p).strip():  # (missing, unreadable, not UTF-8, a folder: read_text says which)
            raise DataError(f"the text file {p} is empty; pick a text with at least {self.context} tokens")
        return self


def check_window(max_tokens: int, context: int) -> None:
    if max_tokens < context:  # (the text may well be long enough: the cut is what is short)
        raise DataError(f"max tokens {max_tokens} is less than one window of context {context}: lower the "
                        f"context or score more tokens")


def text_digest(p: Path) -> str:
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise DataError(f"cannot read the text file {p}: {e.strerror or e}") from None


def read_text(p: Path) -> str:
    if not p.exists():
        raise DataError(f"text file not found: {p}")
    if not p.is_file():
        raise DataError(f"{p} is not a file; pick a plain-text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{p} is not UTF-8 text; pick a plain-text file") from None
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror or e}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def token_windows(tokenizer, text_file: Path, max_tokens: int, context: int):
    """-> (windows: list[list[int]], bos id or None). Raises DataError if the text is too short."""
    if context < 2:
        raise DataError("context must be at least 2 tokens")
    text = read_text(text_file)
    if not text.strip():
        raise DataError(f"the text file {text_file} is empty; pick a text with at least {context} tokens")
    check_window(max_tokens, context)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < context:
        raise DataError(f"the text in {text_file.name} has {len(ids)} tokens, fewer than the context of "
                        f"{context}: use a longer text or a smaller context")
    windows = [ids[i:i + context] for i in range(0, len(ids) - context + 1, context)]
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    return windows, bos


def perplexity(model, tokenizer, text_file: Path, max_tokens: int, context: int,
               progress: Callable[[float], None] | None = None,
               check_cancel: Callable[[], None] | None = None) -> dict:
    import torch

    from .techniques.kv_cache import cache_bytes, chunked_logits, kv_technique

    windows, bos = token_windows(tokenizer, text_file, max_tokens, context)
    kv = kv_technique(model)  # a KV-cache technique: each window is fed in chunks through its cache
    nll, scored = 0.0, 0
    with torch.inference_mode():
        for i, w in enumerate(windows):
            if check_cancel:
                check_cancel()
            ids = torch.tensor([([bos] if bos is not None else []) + w])
            if kv is None:
                logits = model(ids, use_cache=False).logits[0].float()   # (T, V)
            else:
                logits, cache = chunked_logits(model, ids)
            logp = torch.log_softmax(logits[:-1], dim=-1)             # predicts ids[1:]
            target = ids[0, 1:]
            nll -= float(logp.gather(1, target[:, None]).sum())
            scored += target.numel()
            if progress:
                progress((i + 1) / len(windows))
    mean = nll / scored
    out = {"ppl": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "tokens_scored": scored, "windows": len(windows),
           "context": context, "bos": bos is not None}
    if kv is not None:  # what the cache holds at the end of a window, per token it has seen
        tokens = cache.get_seq_length()
        out.update(kv_cache=kv[0], kv_bytes_per_token=cache_bytes(cache) / tokens, kv_tokens=tokens)
    return out


def decode_speed(model, tokenizer, text_file: Path, prompt_tokens: int, new_tokens: int,
                 repeats: int, check_cancel: Callable[[], None] | None = None) -> dict:
    """Prefill and greedy decode with the KV cache; one warm-up, then the median of `repeats`."""
    import torch

    from .techniques.kv_cache import cache_bytes, forward, make_cache

    ids = tokenizer(read_text(text_file), add_special_tokens=False)["input_ids"][:prompt_tokens]
    prompt = torch.tensor([ids])
    pre, dec = [], []
    with torch.inference_mode():
        for r in range(repeats + 1):
            if check_cancel:
                check_cancel()
            cache = make_cache(model)  # the model's KV technique, or the full DynamicCache
            t0 = time.perf_counter()
            out = forward(model, prompt, cache)
            t1 = time.perf_counter()
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            if r:  # the first run warms up
                pre.append(t1 - t0)
                dec.append(t2 - t1)
    return {"prefill_tokens_per_s": prompt.shape[1] / statistics.median(pre),
            "decode_tokens_per_s": new_tokens / statistics.median(dec),
            "prompt_tokens": prompt.shape[1], "new_tokens": new_tokens,
            "kv_bytes_per_token": cache_bytes(cache) / cache.get_seq_length(), "kv_tokens": cache.get_seq_length()}


def greedy(model, ids: list[int], new_tokens: int, eos: int | None = None) -> list[int]:
    """The app's greedy continuation of `ids` with the KV cache (the model's own cache technique)."""
    import torch

    from .techniques.kv_cache import forward, make_cache

    out_ids: list[int] = []
    with torch.inference_mode():
        out = forward(model, torch.tensor([ids]), make_cache(model))
        for _ in range(new_tokens):
            nxt = int(out.logits[0, -1].argmax())
            out_ids.append(nxt)
            if nxt == eos or len(out_ids) == new_tokens:
                break
            out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return out_ids


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024
