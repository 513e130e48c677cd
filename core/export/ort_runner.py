"""Run an exported causal LM (optimum `text-generation-with-past` layout) in onnxruntime.

Only numpy and onnxruntime: no torch, no transformers, no project imports, so this file can be
copied next to an export as a standalone `generate.py` (its `main` then needs the `tokenizers`
package for tokenizer.json). The engine uses the same functions to verify an export: perplexity
on given token windows, and prefill / greedy-decode speed with the KV cache.

Graph contract (what optimum writes for Llama-like models):
  inputs   input_ids (B, T) int64, attention_mask (B, P+T) int64, position_ids (B, T) int64,
           past_key_values.{i}.key / .value (B, kv_heads, P, head_dim)
  outputs  logits (B, T, V), present.{i}.key / .value (B, kv_heads, P+T, head_dim)
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import numpy as np
import onnxruntime as ort

SHARED_KV_KEY = "squeeze.kv_shared_buffer"
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def make_session(path, threads: int | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or cpu_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's default: worker threads spin between ops. The exported graph runs ~3,000 small
    # ops per decoded token, and waking sleeping threads for each costs more than the weights: on an
    # idle 2-core machine int8 decode 29.8 -> 34.8 tok/s with spinning (one process, same file). It is
    # also what a user deploying the file gets. (On a busy machine spinning threads steal cores;
    # session.intra_op.allow_spinning = 0 is the knob for that.)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    # Every decode step feeds a mask one token longer, so a memory pattern planned for one step's
    # shapes never serves the next: skipping the planning is ~1 % faster per int4 step (10 rounds).
    so.enable_mem_pattern = False
    so.log_severity_level = 3  # errors only: no per-node warnings on stderr
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class CausalLM:
    """One session, with the names and shapes of its cache inputs read from the graph."""

    def __init__(self, path_or_session, threads: int | None = None):
        s = path_or_session if isinstance(path_or_session, ort.InferenceSession) else make_session(path_or_session, threads)
        self.session = s
        inputs = {i.name: i for i in s.get_inputs()}
        self.input_names = set(inputs)
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_order)
        self.present_for = {n: "present." + n[len("past_key_values."):] for n in self.past_names}
        self.output_names = ["logits"] + [self.present_for[n] for n in self.past_names]
        # A graph whose attention is onnxruntime's GroupQueryAttention can decode into one
        # preallocated cache per layer that is both its past input and its present output (the
        # "shared buffer": no step copies the growing cache); core/export/graph.py marks such graphs.
        meta = s.get_modelmeta().custom_metadata_map
        self.shared_kv = meta.get(SHARED_KV_KEY) == "1"
        self._past_meta = {}
        vocab = next((o.shape[-1] for o in s.get_outputs() if o.name == "logits"), None)
        self.vocab = vocab if isinstance(vocab, int) else None
        self._io = self._io_past = None  # the binding kept between decode steps (shared caches)
        for n in self.past_names:  # (B, kv_heads, P, head_dim): heads and head_dim are fixed ints
            shape = inputs[n].shape
            self._past_meta[n] = ((shape[1], shape[3]), _NP_TYPES.get(inputs[n].type, np.float32))

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, h, 0, d), dtype=t) for n, ((h, d), t) in self._past_meta.items()}

    def forward(self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None):
        """ids (B, T) int64 -> (logits (B, T, V), the cache to feed back as `past`)."""
        ids = np.asarray(ids, dtype=np.int64)
        b, t = ids.shape
        past = past if past is not None else self.empty_past(b)
        p = next(iter(past.values())).shape[2] if past else 0
        feed = {"input_ids": ids, **past}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = np.ones((b, p + t), dtype=np.int64)
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.broadcast_to(np.arange(p, p + t, dtype=np.int64), (b, t)).copy()
        out = self.session.run(self.output_names, feed)
        present = dict(zip(self.past_names, out[1:]))
        return out[0], present


    # Decoding through IO binding: the cache stays in onnxruntime's memory between steps (each
    # present.* output is fed back as the next past_key_values.* input as an OrtValue), so no step
    # copies the growing cache out to numpy and back.
    def start(self, ids: np.ndarray):
        """Prefill: ids (1, T) -> (logits (1, T, V) numpy, cache as OrtValues, cache length)."""
        ids = np.asarray(ids, dtype=np.int64)
        past = self._buffers(ids.shape[1]) if self.shared_kv else \
            {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.empty_past(1).items()}
        return self._bound(ids, past, 0)

    def _buffers(self, need: int, old: dict | None = None) -> dict:
        """Shared-buffer caches with room for `need` tokens (rounded up to a power of two, at least
        256), holding what `old` held."""
        cap = max(256, 1 << (need - 1).bit_length())
        out = {}
        for n, ((h, d), t) in self._past_meta.items():
            a = np.zeros((1, h, cap, d), dtype=t)
            if old:
                prev = old[n].numpy()
                a[:, :, :prev.shape[2]] = prev
            out[n] = ort.OrtValue.ortvalue_from_numpy(a)
        return out

    def step(self, ids: np.ndarray, past: dict, p: int):
        """One decode step on an OrtValue cache of length p -> (logits, cache, p + T)."""
        return self._bound(np.asarray(ids, dtype=np.int64), past, p)

    def _bound(self, ids: np.ndarray, past: dict, p: int):
        b, t = ids.shape
        if self.shared_kv and p + t > next(iter(past.values())).shape()[2]:
            past = self._buffers(p + t, past)  # full: a buffer twice as long, the cache copied once
        # The binding of the cache is kept between steps when the cache is written in place (the
        # same buffers every step): a step then re-binds only its token, mask, positions and logits
        # (~5 % of an int4 step's time went to re-binding 60 caches in Python).
        keep = self.shared_kv and self.vocab is not None
        io = self._io if keep and self._io_past is past else None
        if io is None:
            io = self.session.io_binding()
            for n, v in past.items():
                io.bind_ortvalue_input(n, v)
            if keep:
                for n in self.past_names:  # written in place: the present is the past's own buffer
                    io.bind_ortvalue_output(self.present_for[n], past[n])
                self._io, self._io_past = io, past
        io.bind_cpu_input("input_ids", ids)
        if "attention_mask" in self.input_names:
            io.bind_cpu_input("attention_mask", np.ones((b, p + t), dtype=np.int64))
        if "position_ids" in self.input_names:
            io.bind_cpu_input("position_ids", np.arange(p, p + t, dtype=np.int64)[None, :].repeat(b, 0))
        if keep:
            logits = np.empty((b, t, self.vocab), dtype=np.float32)  # the run writes into it: no copy out
            io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            self.session.run_with_iobinding(io)
            return logits, past, p + t
        io.bind_output("logits", "cpu")  # (outputs come back in the order they are bound)
        for n in self.past_names:
            if self.shared_kv:
                io.bind_ortvalue_output(self.present_for[n], past[n])
            else:
                io.bind_output(self.present_for[n], "cpu")
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        return outs[0].numpy(), (past if self.shared_kv else dict(zip(self.past_names, outs[1:]))), p + t


def _layer_order(name: str):
    # past_key_values.{i}.key / .value: numeric layer order, key before value
    _, i, kv = name.split(".")
    return int(i), kv


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log p(target) for logits (T, V) float and targets (T,) int."""
    x = logits.astype(np.float32, copy=False)
    m = x.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1, dtype=np.float64))
    return float((lse - x[np.arange(len(targets)), targets]).sum())


def perplexity(lm: CausalLM, windows: list[list[int]], bos: int | None,
               progress: Callable[[float], None] | None = None,
               check_cancel: Callable[[], None] | None = None) -> dict:
    """Same protocol as the torch evaluation: BOS (if any) is unscored context before each window;
    every later token is scored given the ones before it (no cache across windows)."""
    nll, scored = 0.0, 0
    for i, w in enumerate(windows):
        if check_cancel:
            check_cancel()
        ids = np.array([([bos] if bos is not None else []) + list(w)], dtype=np.int64)
        logits, _ = lm.forward(ids)                       # (1, T, V)
        nll += log_softmax_nll(logits[0, :-1], ids[0, 1:])
        scored += ids.shape[1] - 1
        if progress:
            progress((i + 1) / len(windows))
    return {"ppl": math.exp(nll / scored), "tokens_scored": scored, "windows": len(windows)}


def greedy(lm: CausalLM, prompt: list[int], new_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy continuation with the KV cache: the prompt once, then one token per step."""
    logits, past, p = lm.start(np.array([prompt], dtype=np.int64))
    out = []
    for _ in range(new_tokens):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eos or len(out) == new_tokens:
            break
        logits, past, p = lm.step(np.array([[nxt]], dtype=np.int64), past, p)
    return out


def decode_speed(lm: CausalLM, prompt: list[int], new_tokens: int, repeats: int,
                 check_cancel: Callable[[], None] | None = None) -> dict:
    """Prefill and greedy decode with the KV cache; one warm-up, then the median of `repeats`
    (as core.evaluate.decode_speed does for torch)."""
    ids = np.array([prompt], dtype=np.int64)
    pre, dec = [], []
    for r in range(repeats + 1):
        if check_cancel:
            check_cancel()
        t0 = time.perf_counter()
        logits, past, p = lm.start(ids)
        t1 = time.perf_counter()
        nxt = logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            logits, past, p = lm.step(nxt, past, p)
            nxt = logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        if r:  # the first run warms up
            pre.append(t1 - t0)
            dec.append(t2 - t1)
    return {"prefill_tokens_per_s": ids.shape[1] / statistics.median(pre),
            "decode_tokens_per_s": new_tokens / statistics.median(dec),
            "prompt_tokens": ids.shape[1], "new_tokens": new_tokens}


def main(argv: list[str] | None = None) -> int:
    """Standalone use next to an export: python generate.py "Once upon a time" --new-tokens 40"""
    import argparse
    from pathlib import Path

    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description="Greedy generation with the exported ONNX model.")
    ap.add_argument("prompt")
    ap.add_argument("--model", default=str(here / "model.onnx"))
    ap.add_argument("--tokenizer", default=str(here / "tokenizer.json"))
    ap.add_argument("--new-tokens", type=int, default=40)
    a = ap.parse_args(argv)
    from tokenizers import Tokenizer

    import json

    for what, path in (("model", a.model), ("tokenizer", a.tokenizer)):  # one line, not onnxruntime's traceback
        if not Path(path).is_file():
            ap.error(f"no {what} file at {path}; pass --{what} or run this script from its export folder")
    if a.new_tokens < 1:
        ap.error(f"--new-tokens must be at least 1; got {a.new_tokens}")
    try:
        tok = Tokenizer.from_file(a.tokenizer)
        lm = CausalLM(a.model)
    except Exception as e:  # a damaged or foreign file
        ap.error(f"cannot load {a.model} / {a.tokenizer}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    eos = None
    if (here / "config.json").is_file():  # stop at end-of-text, as the app does
        eos = json.loads((here / "config.json").read_text()).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
    ids = tok.encode(a.prompt).ids
    print(a.prompt + tok.decode(greedy(lm, ids, a.new_tokens, eos)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
