"""Side by side with the peers a user would pick instead (issue 4): optimum-quanto int8 / int4
weights and torch.ao dynamic int8, beside our own techniques, on the same windows in one
process: perplexity, size on disk, decode tok/s. Every peer quantizes the decoder's Linear
layers only (the LM head / tied embedding stays float, as in our rows).

    .venv/bin/pip install -e '.[bench]'      # optimum-quanto, for this script only
    .venv/bin/python bench/peers.py [--max-tokens 32768] [--context 1024]

Writes its section of bench/RESULTS.md ("peers") and bench/results/peers.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from calibrated import MODEL, TEXT, isolated_home  # noqa: E402

OURS = [
    ("ours: rtn int8 g64", [{"technique": "rtn", "bits": 8, "group_size": 64}]),
    ("ours: dynamic_int8 (down_proj float)", [{"technique": "dynamic_int8"}]),
    ("ours: rtn int4 g64 sym", [{"technique": "rtn", "bits": 4, "group_size": 64}]),
]


def decoder_linear_names(model) -> list[str]:
    import torch
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]


def measure_model(model, tok, a) -> dict:
    from core import evaluate as ev
    p = ev.perplexity(model, tok, a.text, a.max_tokens, a.context)
    s = ev.decode_speed(model, tok, a.text, 128, 32, 3)
    return {"ppl": p["ppl"], "decode": s["decode_tokens_per_s"], "tokens": p["tokens_scored"]}


def measure_no_grad(model, tok, a) -> dict:
    """The same protocol (windows, BOS, scoring) under no_grad: quanto's int4 kernels refuse
    inference mode, which core.evaluate uses."""
    import math
    import statistics

    import torch

    from core import evaluate as ev
    windows, bos = ev.token_windows(tok, a.text, a.max_tokens, a.context)
    nll, scored = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([([bos] if bos is not None else []) + w])
            logp = torch.log_softmax(model(ids, use_cache=False).logits[0].float()[:-1], dim=-1)
            nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
            scored += ids.shape[1] - 1
        from transformers import DynamicCache
        prompt = torch.tensor([tok(ev.read_text(a.text), add_special_tokens=False)["input_ids"][:128]])
        dec = []
        for r in range(4):
            out = model(prompt, past_key_values=DynamicCache(), use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(32):
                out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
            if r:
                dec.append(time.perf_counter() - t0)
    return {"ppl": math.exp(nll / scored), "decode": 32 / statistics.median(dec), "tokens": scored}


def quanto(fp, tok, a, weights: str, tmp: Path) -> dict:
    from optimum import quanto as q

    from core import models
    m = models.load(MODEL)[0]  # a fresh copy: quanto's int4 packing refuses tensors touched by inference mode
    q.quantize(m, weights=getattr(q, weights), exclude=["lm_head"])
    q.freeze(m)
    import torch
    f = tmp / f"quanto-{weights}.pt"
    torch.save(m.state_dict(), f)  # quanto's packed weight tensors, as its own serialization keeps them
    return {**measure_no_grad(m, tok, a), "size_bytes": f.stat().st_size}


def torch_ao_dynamic(fp, tok, a, tmp: Path) -> dict:
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
    m = copy.deepcopy(fp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = quantize_dynamic(m, {n: default_dynamic_qconfig for n in decoder_linear_names(m)}, dtype=torch.qint8)
    f = tmp / "torch-ao-dynamic.pt"
    torch.save(m.state_dict(), f)
    return {**measure_model(m, tok, a), "size_bytes": f.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--text", type=Path, default=TEXT)
    a = ap.parse_args()
    os.environ["SQUEEZE_HOME"] = str(isolated_home())

    from core import models
    from core.jobs.client import run_inline
    from core.jobs.spec import JobSpec
    from results_md import fmt_table, write_section

    fp, tok, base_dir = models.load(MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="squeeze-peers-"))
    rows = []

    def add(name, how, fn):
        t0 = time.time()
        try:
            r = fn()
        except Exception as e:  # a peer that cannot run here is reported, not hidden
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        rows.append({"name": name, "how": how, **r})
        print(f"{name}: {r} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    add("fp32", "transformers, float32", lambda: {**measure_model(fp, tok, a),
                                                  "size_bytes": models.size_on_disk(base_dir)})
    ev = dict(text=str(a.text), max_tokens=a.max_tokens, context=a.context, prompt_tokens=128, new_tokens=32, repeats=3)
    for name, steps in OURS:
        def ours(steps=steps):
            r = run_inline(JobSpec(model=MODEL, recipe={"steps": steps}, eval=ev))
            if r.outcome != "done":
                raise RuntimeError(r.error)
            res = r.result
            return {"ppl": res["ppl"], "decode": res["decode_tokens_per_s"], "size_bytes": res["size_bytes"],
                    "tokens": res["tokens_scored"]}
        add(name, "squeeze eval (saved variant loaded back)", ours)
    add("optimum-quanto int8 weights", "quantize(weights=qint8) + freeze", lambda: quanto(fp, tok, a, "qint8", tmp))
    add("optimum-quanto int4 weights", "quantize(weights=qint4) + freeze", lambda: quanto(fp, tok, a, "qint4", tmp))
    add("torch.ao dynamic int8", "quantize_dynamic(qint8), decoder Linears", lambda: torch_ao_dynamic(fp, tok, a, tmp))

    base = rows[0]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["name"], r["how"], "–", "–", "–", "–", "–", "–", r["error"]])
            continue
        table.append([r["name"], r["how"], f"{r['ppl']:.3f}", f"{r['ppl'] / base['ppl']:.3f}×",
                      f"{r['size_bytes'] / 1e6:.1f}", f"{r['size_bytes'] / base['size_bytes']:.3f}×",
                      f"{r['decode']:.1f}", f"{r['decode'] / base['decode']:.2f}×", ""])
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "peers.json").write_text(json.dumps(rows, indent=2))
    from importlib.metadata import version
    body = f"""## Peers side by side (issue 4)

Command: `.venv/bin/python bench/peers.py --max-tokens {a.max_tokens} --context {a.context}`
({base['tokens']:,} tokens of WikiText-2 test scored, context {a.context}, the same windows for every row, one
process; decode = 32 greedy tokens after a 128-token prompt, KV cache, median of 3 after a warm-up;
optimum-quanto {version('optimum-quanto')}, torch {version('torch')}. Peer sizes are their own saved
state dicts; the machine is shared, so speeds are indicative.)

{fmt_table(["variant", "how", "ppl", "× fp32", "size MB", "× fp32", "decode tok/s", "× fp32", "note"], table)}
"""
    write_section("peers", body)
    print(body)


if __name__ == "__main__":
    main()
