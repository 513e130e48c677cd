"""KV-cache techniques (issue 5) on the bundled SmolLM2-135M, WikiText-2 test, context 2048:
kv_quant int8 / int4 and kv_window (4 sinks + 256 recent) next to the full fp32 cache measured in
the same process, through the engine `squeeze eval` runs (apply -> save -> load back -> evaluate).

    .venv/bin/python bench/kv_cache.py [--max-tokens 32768] [--context 2048]

With a KV technique the evaluation feeds each window in chunks of 128 tokens through the cache
(earlier chunks are seen only through the quantized / windowed cache); the full-cache row is the
usual one-shot protocol. KV bytes per token: what the cache holds at the end of a window divided by
the tokens it has seen (the full cache: its DynamicCache). Writes the "kv-cache" section of
bench/RESULTS.md and bench/results/kv_cache.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import HERE, MODEL, ROOT, TEXT, eval_settings, isolated_home, run_recipe  # noqa: E402, F401 (repo root on sys.path)
# name, recipe steps, ppl bar (x full cache), bytes bar (x full cache; None: flat in length)
ROWS = [
    ("kv_quant int8", [{"technique": "kv_quant", "bits": 8}], 1.01, 0.5),
    ("kv_quant int4", [{"technique": "kv_quant", "bits": 4}], 1.05, 0.3),
    ("kv_window 4 sinks + 256 recent", [{"technique": "kv_window", "sinks": 4, "window": 256}], 1.2, None),
]
FLAT_AT = (512, 1024, 2048)


def flat_bytes(variant_dir: str, text: Path) -> dict[int, int]:
    """Cache bytes of the saved variant after reading the first n tokens of the text."""
    import torch

    from core import evaluate as ev
    from core.techniques import kv_cache as kc
    from core.variant import load_variant

    model, tok = load_variant(Path(variant_dir))
    ids = tok(ev.read_text(text), add_special_tokens=False)["input_ids"][:max(FLAT_AT) - 1]
    ids = torch.tensor([[tok.bos_token_id] + ids])
    out = {}
    with torch.inference_mode():
        for n in FLAT_AT:
            _, cache = kc.chunked_logits(model, ids[:, :n])
            out[n] = kc.cache_bytes(cache)
    return out


# what kv_window's span is worth on this model: other sink / window settings, and the oracle
WINDOW_SWEEP = [{"sinks": 0, "window": 256}, {"sinks": 4, "window": 512}, {"sinks": 4, "window": 1024}]
ORACLE_SPAN, ORACLE_BLOCK = 224, 64


def window_sweep(a) -> list[dict]:
    """kv_window at other settings (in process, same protocol), and the StreamingLLM paper's oracle
    at the 4 + 256 span: a sliding window with re-computation, each block of 64 tokens read fresh
    after BOS + the 224 tokens before it (so a token sees BOS + 224..287 earlier tokens, 256 on average,
    where kv_window 4 + 256 gives 4 sinks + 256)."""
    import math

    import torch

    from core import evaluate as ev
    from core import models
    from core.techniques import kv_cache as kc
    from core.techniques import registry
    from core.techniques.base import StepContext

    model, tok, _ = models.load(MODEL)
    out = []
    for vals in WINDOW_SWEEP:
        t0 = time.time()
        t = registry.get("kv_window")
        t.apply(model, t.make(vals), StepContext())
        r = ev.perplexity(model, tok, a.text, a.max_tokens, a.context)
        delattr(model, kc.ATTR)
        out.append({"label": f"kv_window {vals['sinks']} sinks + {vals['window']} recent", "ppl": r["ppl"],
                    "kv_bytes_per_token": r["kv_bytes_per_token"], "steps": [{"technique": "kv_window", **vals}]})
        print(f"{out[-1]['label']}: ppl {r['ppl']:.3f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    t0 = time.time()
    windows, bos = ev.token_windows(tok, a.text, a.max_tokens, a.context)
    nll = n = 0
    with torch.inference_mode():
        for w in windows:
            ids = [bos] + w
            for b in range(1, len(ids), ORACLE_BLOCK):
                inp = torch.tensor([[bos] + ids[max(1, b - ORACLE_SPAN):b + ORACLE_BLOCK]])
                logp = torch.log_softmax(model(inp, use_cache=False).logits[0, :-1].float(), -1)
                lp = logp.gather(1, inp[0, 1:, None])[:, 0]
                k = min(ORACLE_BLOCK, len(ids) - b)   # the block's own tokens: the last k targets
                nll -= float(lp[-k:].sum())
                n += k
    out.append({"label": f"oracle: sliding window with re-computation (BOS + {ORACLE_SPAN}..{ORACLE_SPAN + ORACLE_BLOCK - 1} "
                         f"earlier tokens, full cache)", "ppl": math.exp(nll / n), "kv_bytes_per_token": None,
                "steps": None})
    print(f"{out[-1]['label']}: ppl {out[-1]['ppl']:.3f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--text", type=Path, default=TEXT)
    p.add_argument("--home", type=Path)
    a = p.parse_args()

    from results_md import fmt_table, write_section

    os.environ["SQUEEZE_HOME"] = str(a.home or isolated_home())
    ev = eval_settings(a)
    t_start = time.time()

    def measure(label, steps):
        t0 = time.time()
        res = run_recipe(label, steps, ev)
        print(f"{label}: ppl {res['ppl']:.3f}, KV {res['kv_bytes_per_token']:.0f} B/token "
              f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        return {"label": label, "steps": steps, "seconds": round(time.time() - t0, 1),
                **{k: res.get(k) for k in ("ppl", "tokens_scored", "windows", "kv_bytes_per_token", "kv_tokens",
                                           "decode_tokens_per_s", "prefill_tokens_per_s", "variant_dir")}}

    base = measure("full cache (fp32 DynamicCache)", [])
    table = [["full cache (fp32)", "", f"{base['ppl']:.3f}", "1.000×", f"{base['kv_bytes_per_token']:,.0f}",
              "1.000×", "", f"{base['decode_tokens_per_s']:.1f}", "", "`[]`"]]
    raw = []
    for name, steps, ppl_bar, bytes_bar in ROWS:
        r = measure(name, steps)
        pr = r["ppl"] / base["ppl"]
        br = r["kv_bytes_per_token"] / base["kv_bytes_per_token"]
        extra = {}
        if bytes_bar is None:
            extra["bytes_after"] = flat_bytes(r["variant_dir"], a.text)
            sizes = list(extra["bytes_after"].values())
            bytes_ok = sizes[-1] == sizes[-2]  # flat once the window is full
            bytes_txt = "flat: " + ", ".join(f"{b / 1e6:.2f} MB after {n:,}" for n, b in extra["bytes_after"].items())
            bar_txt = f"ppl ≤ {ppl_bar}×, bytes flat"
        else:
            bytes_ok = br <= bytes_bar
            bytes_txt = f"≤ {bytes_bar}×"
            bar_txt = f"ppl ≤ {ppl_bar}×, bytes ≤ {bytes_bar}×"
        ok = pr <= ppl_bar and bytes_ok
        table.append([name, bar_txt, f"{r['ppl']:.3f}", f"**{pr:.4f}×**", f"{r['kv_bytes_per_token']:,.0f}",
                      f"**{br:.3f}×**" + ("" if bytes_bar else f" ({bytes_txt})"), "reached" if ok else "**not reached**",
                      f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}×",
                      "`" + json.dumps(steps) + "`"])
        raw.append({**r, **extra, "ppl_ratio": pr, "bytes_ratio": br, "reached": ok})
        out = HERE / "results" / "kv_cache.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"full": base, "rows": raw, "max_tokens": a.max_tokens, "context": a.context},
                                  indent=2))

    sweep = window_sweep(a)
    sweep_rows = [[r["label"], f"{r['ppl']:.3f}", f"{r['ppl'] / base['ppl']:.3f}×",
                   "" if r["kv_bytes_per_token"] is None else f"{r['kv_bytes_per_token'] / base['kv_bytes_per_token']:.3f}×",
                   "`" + json.dumps(r["steps"]) + "`" if r["steps"] else ""] for r in sweep]
    out.write_text(json.dumps({"full": base, "rows": raw, "window_sweep": sweep, "max_tokens": a.max_tokens,
                               "context": a.context}, indent=2))
    minutes = (time.time() - t_start) / 60
    body = f"""## KV cache (issue 5): kv_quant int8 / int4, kv_window, context {a.context}

Command: `.venv/bin/python bench/kv_cache.py --max-tokens {a.max_tokens} --context {a.context}`
(each row is what `squeeze eval {MODEL} --recipe R --text wiki.test.raw --max-tokens {a.max_tokens} --context {a.context} --json` computes:
apply, save, load back, evaluate; {base['tokens_scored']:,} tokens of WikiText-2 test scored in {base['windows']} windows of
{a.context} tokens after BOS; {minutes:.0f} min for the whole run.) Ratios are to the full fp32 cache
measured in the same process. With a KV technique each window is fed 128 tokens at a time through
the cache, with a mask that gives every token what it would see in token-by-token decoding
(kv_quant: the groups quantized by then, dequantized, and the float residual; kv_window: the sinks
and its own 256 predecessors), so the numbers are those of streaming one token at a time
(tested on the tiny model: chunked logits = one-by-one logits). KV bytes per token = bytes the cache
holds at the end of a {a.context + 1}-token window / tokens seen (int4 codes stored two per byte, fp16
scale and minimum per group of 32, the newest 64-95 tokens in fp32); the full cache's is its
DynamicCache (2 × 30 layers × 3 KV heads × 64 × 4 bytes). Decode: prompt 128, 32 greedy tokens,
median of 3 after a warm-up, on a shared 2-core machine (indicative only).

{fmt_table(["recipe", "bar", "ppl", "× full", "KV bytes/token", "× full", "", "decode tok/s", "× full",
            "recipe steps"], table)}

What kv_window's 260-token span is worth on this model (same text and windows, same process; the
full cache attends to 1,024 earlier tokens on average, the window to 260):

{fmt_table(["setting", "ppl", "× full", "KV bytes × full", "recipe steps"], sweep_rows)}
"""
    write_section("kv-cache", body)
    print(body)


if __name__ == "__main__":
    main()
