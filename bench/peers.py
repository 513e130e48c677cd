"""Side by side with the peers a user would pick instead (issue 4): optimum-quanto int8 / int4
weights and torch.ao dynamic int8, beside our own techniques, on the same windows in one
process: perplexity, size on disk, decode tok/s. Every peer quantizes the decoder's Linear
layers only (the LM head / tied embedding stays float, as in our rows).

    .venv/bin/pip install -e '.[bench]'      # optimum-quanto, for this script only
    .venv/bin/python bench/peers.py [--max-tokens 32768] [--context 1024]

Writes its section of bench/RESULTS.md ("peers") and bench/results/peers.json.

With --onnx (issue 6): the deployment table instead. Our exports (`squeeze export`: fp32, int8,
int4 from gptq, int8 of smoothquant, fp32 of a layer-pruned model) beside the ONNX paths a user
would pick instead (onnxruntime quantize_dynamic, stock MatMulNBits int8 / int4, optimum's
ORTQuantizer), all verified the same way in one process; ratios to torch fp32 eager measured in
the same run. Section "peers-onnx", bench/results/peers-onnx.json.

    .venv/bin/python bench/peers.py --onnx [--max-tokens 8192] [--context 1024]
    .venv/bin/python bench/peers.py --onnx --exports-only --max-tokens 1024   # files for decode_rounds.py
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


GPTQ4 = [{"technique": "gptq", "bits": 4, "group_size": 64, "symmetric": True, "outliers": 16, "act_order": True,
          "clip": True, "awq_scaling": True, "sequential": True, "samples": 128}]
# The int4 deployment recipe: no fp16 columns (each costs a Gather + MatMul + Add per projection in
# onnxruntime), every down_proj at 8 bits instead (calibrated ideas: 1.096x vs 1.101x with the columns).
GPTQ4_MIXED = [{**GPTQ4[0], "outliers": 0, "upgrade_8bit": "mlp.down_proj"}]
OURS_ONNX = [  # name, recipe steps, --quantize, bar kind (the fused graph unless the name says portable)
    ("ours: ONNX fp32", [], None, "fp32"),
    ("ours: ONNX fp32, portable graph", [], None, None),
    ("ours: ONNX int8", [], "int8", "int8"),
    ("ours: ONNX int4 from gptq 4-bit g64", GPTQ4, "int4", "int4"),
    ("ours: ONNX int4 from gptq 4-bit g64, down_proj 8-bit", GPTQ4_MIXED, "int4", "int4"),
    ("ours: ONNX int8 of smoothquant", [{"technique": "smoothquant", "sequential": True}], "int8", "int8"),
    ("ours: ONNX fp32 of structured_prune 25 % layers", [{"technique": "structured_prune", "layers": 0.25, "ffn": 0.0}], None, None),
]
# bar kind -> (ppl x torch fp32 <=, decode x torch fp32 >=, file x fp32 ONNX <=)
BARS = {"fp32": (1.005, 1.1, None), "int8": (1.03, 3.0, 0.30), "int4": (1.12, 4.0, 0.22)}
ROOFLINE_BAR = 0.60


def onnx_peers(fp32_dir: Path, tmp: Path):
    """(name, how, function(dst folder) -> model file) of the ONNX paths a user would pick instead."""
    from core.export import quantize as qz

    def stock(cand):
        def run(dst: Path) -> Path:
            f = dst / "model.onnx"
            qz.quantize(fp32_dir / "model.onnx", f, cand)
            return f
        return run

    def ort_quantizer(dst: Path) -> Path:
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig
        q = ORTQuantizer.from_pretrained(fp32_dir, file_name="model.onnx")
        q.quantize(save_dir=dst, quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True))
        return next(dst.glob("*quantized*.onnx"))

    return [
        ("onnxruntime quantize_dynamic int8 per-channel", "quantize_dynamic(per_channel=True), MatMul + Gather",
         stock(qz.by_name("dynamic-per-channel"))),
        ("optimum ORTQuantizer avx512_vnni", "dynamic, per-channel", ort_quantizer),
        ("onnxruntime MatMulNBits int8 weight-only", "stock quantizer, block 128, LM head fp32",
         stock(qz.Candidate("stock-wo8", "weight_only", 128, 0, "fp32"))),
        ("onnxruntime MatMulNBits int4 RTN b64 sym", "stock quantizer, accuracy level 4, LM head fp32",
         stock(qz.Candidate("stock-wo4", "weight_only", 64, 4, "fp32", bits=4, symmetric=True))),
    ]


def onnx_main(a) -> None:
    """The deployment table (issue 6): our exports and the ONNX peers, verified alike."""
    from importlib.metadata import version

    from core import models, roofline
    from core.evaluate import EvalSettings
    from core.export import onnx as ox
    from core.jobs.client import run_inline
    from core.jobs.spec import JobSpec
    from results_md import fmt_table, write_section

    ev = dict(text=str(a.text), max_tokens=a.max_tokens, context=a.context, prompt_tokens=128, new_tokens=128,
              repeats=3)
    tmp = Path(tempfile.mkdtemp(prefix="squeeze-peers-onnx-"))
    rows, t_start = [], time.time()
    for name, steps, q, bar in OURS_ONNX:
        t0 = time.time()
        out = tmp / name.split(": ")[1].replace(" ", "-").replace("%", "pct")
        graph = "portable" if "portable" in name else "fused"
        r = run_inline(JobSpec(model=a.model, recipe={"steps": steps}, eval=ev, kind="export",
                               export={"out": str(out), "quantize": q, "graph": graph}))
        if r.outcome != "done":
            rows.append({"name": name, "error": str(r.error)})
            continue
        res = r.result
        fell_back = graph == "fused" and res.get("graph_note")  # the variant is not a plain Llama
        rows.append({"name": name, "how": f"squeeze export --quantize {q or 'none'} --graph {graph}"
                     + (f" ({res.get('quant_path')})" if res.get("quant_path") else "")
                     + (f"; written portable: {fell_back}" if fell_back else ""),
                     "bar": bar, "folder": str(out), **{k: v for k, v in res.items() if k != "candidates"}})
        print(f"{name}: ppl {res['ppl_onnx']:.3f} (torch {res['ppl_torch']:.3f}), decode "
              f"{res['decode_tokens_per_s_onnx']:.1f} (torch {res['decode_tokens_per_s_torch']:.1f}) "
              f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    if a.exports_only:  # the files for bench/decode_rounds.py, no table
        print(tmp)
        return
    ref = rows[0]  # torch fp32 eager and the fp32 ONNX file: the reference of every ratio
    settings = EvalSettings(**ev)
    fp, tok, _ = models.load(a.model)
    windows, bos, prompt = ox._verification_tokens(tok, settings)
    parity = ox.parity_reference(fp, tok)
    del fp
    bw = roofline.bandwidth()
    portable = next(r for r in rows if "portable" in r["name"])  # the peers start from optimum's own graph
    for name, how, fn in onnx_peers(Path(portable["folder"]), tmp):
        t0 = time.time()
        dst = tmp / name.replace(" ", "-")
        dst.mkdir()
        try:
            f = fn(dst)
            m = ox.verify(f, windows, bos, prompt, settings, parity=parity)
            bpt = roofline.onnx_bytes_per_token(f)
            rows.append({"name": name, "how": how, "bar": None, **m, "size_bytes": ox.model_bytes(f),
                         "bytes_per_token": bpt, "roofline_tokens_per_s": bw / bpt,
                         "roofline_fraction": m["decode_tokens_per_s_onnx"] * bpt / bw})
        except Exception as e:  # a peer that cannot run here is reported, not hidden
            rows.append({"name": name, "how": how, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        print(f"{name}: {rows[-1].get('ppl_onnx', rows[-1].get('error'))} ({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)

    t_ppl, t_dec, f_size = ref["ppl_torch"], ref["decode_tokens_per_s_torch"], ref["size_bytes"]
    table = [["torch fp32 eager (reference)", "transformers", f"{t_ppl:.3f}", "1.000×", "–", "–", "–",
              f"{t_dec:.1f}", "1.00×", f"{t_dec / ref['roofline_tokens_per_s_torch'] * 100:.0f} %", "–", "–", ""]]
    for r in rows:
        if "error" in r:
            table.append([r["name"], r.get("how", ""), "–", "–", "–", "–", "–", "–", "–", "–", "–", "–", r["error"]])
            continue
        x_ppl, x_dec, x_size = r["ppl_onnx"] / t_ppl, r["decode_tokens_per_s_onnx"] / t_dec, r["size_bytes"] / f_size
        verdict = []
        if r["bar"]:
            p_max, d_min, s_max = BARS[r["bar"]]
            verdict += [f"ppl {'ok' if x_ppl <= p_max else 'MISSED'} (≤ {p_max}×)",
                        f"decode {'ok' if x_dec >= d_min else 'MISSED'} (≥ {d_min}×)"]
            if s_max:
                verdict.append(f"file {'ok' if x_size <= s_max else 'MISSED'} (≤ {s_max}×)")
        if r["name"].startswith("ours"):
            verdict.append(f"roofline {'ok' if r['roofline_fraction'] >= ROOFLINE_BAR else 'MISSED'} (≥ 60 %)")
        n_ok = round(r["generation_match"] * len(r["generation_first_diff"]))
        table.append([r["name"], r["how"], f"{r['ppl_onnx']:.3f}", f"{x_ppl:.3f}×", f"{r['size_bytes'] / 1e6:.1f}",
                      f"{x_size:.3f}×", f"{r['prefill_tokens_per_s_onnx']:.0f}", f"{r['decode_tokens_per_s_onnx']:.1f}",
                      f"{x_dec:.2f}×", f"{r['roofline_fraction'] * 100:.0f} %",
                      f"{r['bytes_per_token'] / 1e6:.0f}", f"{n_ok}/{len(r['generation_first_diff'])}",
                      "; ".join(verdict)])
    body = f"""## Deployment: our ONNX exports beside the ONNX peers (issue 6)

Command: `.venv/bin/python bench/peers.py --onnx --max-tokens {a.max_tokens} --context {a.context}`
({ref['tokens_scored_onnx']:,} tokens of WikiText-2 test, context {a.context}, the same windows for every row;
decode = 128 greedy tokens after a 128-token prompt with the KV cache, median of 3 after a warm-up; one process,
{(time.time() - t_start) / 60:.0f} min. Ratios: ppl and decode to torch fp32 eager measured in this run, file to
our fp32 ONNX export. Roofline: measured copy bandwidth {bw / 1e9:.1f} GB/s over the weight bytes read per
token (MB/tok). Greedy: prompts whose first {ox.PARITY_TOKENS} greedy tokens equal torch fp32's (the
exported variant's torch model for our rows). onnxruntime {version('onnxruntime')}, optimum-onnx
{version('optimum-onnx')}, torch {version('torch')}.)

{fmt_table(["path", "how", "ppl", "× torch fp32", "file MB", "× fp32 ONNX", "prefill tok/s", "decode tok/s",
            "× torch fp32", "% roofline", "MB/tok", "greedy", "bar"], table)}
"""
    print(body)
    if a.model == MODEL:  # a smoke run on another model does not replace the table
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "peers-onnx.json").write_text(json.dumps(rows, indent=2, default=str))
        write_section("peers-onnx", body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=None, help="default 32768 (8192 with --onnx)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--onnx", action="store_true", help="the deployment table of issue 6")
    ap.add_argument("--exports-only", action="store_true",
                    help="with --onnx: only write (and verify) our exports, for bench/decode_rounds.py")
    ap.add_argument("--model", default=MODEL, help="(a smoke run on another model; the table is for the bundled one)")
    a = ap.parse_args()
    a.max_tokens = a.max_tokens or (8192 if a.onnx else 32768)
    os.environ["SQUEEZE_HOME"] = str(isolated_home())
    if a.onnx:
        onnx_main(a)
        return

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
