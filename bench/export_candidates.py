"""Every int8 path for the ONNX export, verified on the bundled model -> bench/export_int8.md.

Runs the engine's own export twice (fp32, then int8 with the shipped candidates plus the
reference paths that are known to fail), each verified in onnxruntime on the same windows as
the torch evaluation, and writes one table: perplexity, x fp32 perplexity, size, x fp32 ONNX
size, prefill and decode tok/s, and the verdict of the export's own acceptance rule.

    .venv/bin/python bench/export_candidates.py [--max-tokens 8192] [--context 1024] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import evaluate as ev, models  # noqa: E402
from core.export import quantize as int8  # noqa: E402
from core.export.onnx import INT8_PPL_LIMIT, INT8_SIZE_LIMIT, export_onnx  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bundled:smollm2-135m")
    ap.add_argument("--text", default=str(ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--out", default=str(ROOT / "bench/export_int8.md"))
    a = ap.parse_args()
    command = " ".join([_rel(sys.executable), _rel(sys.argv[0])] + sys.argv[1:])
    settings = ev.EvalSettings(text=a.text, max_tokens=a.max_tokens, context=a.context)
    load0 = os.getloadavg()[0]
    t0 = time.time()

    model, tok, _ = models.load(a.model)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    say("torch fp32: perplexity and speed")
    torch_numbers = {**ev.perplexity(model, tok, settings.text_path(), a.max_tokens, a.context),
                     **ev.decode_speed(model, tok, settings.text_path(), settings.prompt_tokens,
                                       settings.new_tokens, settings.repeats)}
    tmp = Path(tempfile.mkdtemp(prefix="squeeze-bench-export-"))
    try:
        common = dict(settings=settings, torch_numbers=torch_numbers, log=lambda t, level="info": say(t))
        say("ONNX fp32 export + verification")
        fp32 = export_onnx(model, tok, tmp / "fp32", **common)
        say("ONNX int8: every candidate")
        q = export_onnx(model, tok, tmp / "int8", quantize="int8",
                        candidates=int8.CANDIDATES + int8.REFERENCE_CANDIDATES, **common)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    minutes = (time.time() - t0) / 60

    p_t, d_t = torch_numbers["ppl"], torch_numbers["decode_tokens_per_s"]
    fs = fp32["size_bytes"]
    rows = [("torch fp32 (reference)", "-", p_t, None, None, torch_numbers["prefill_tokens_per_s"], d_t,
             "the model the export starts from"),
            ("ONNX fp32 export", "optimum-onnx, text-generation-with-past", fp32["ppl_onnx"], fs,
             fp32["prefill_tokens_per_s_onnx"], None, fp32["decode_tokens_per_s_onnx"],
             "parity ok" if fp32["ok"] else fp32["failure"])]
    shipped = {c.name for c in int8.CANDIDATES}
    for c in q["candidates"]:
        name = c["name"] + ("" if c["name"] in shipped else " (reference only)")
        rows.append((name, c["method"], c["ppl_onnx"], c["size_bytes"], c.get("prefill_tokens_per_s_onnx"), None,
                     c["decode_tokens_per_s_onnx"], ("**ACCEPTED** " if c["accepted"] else "") + c["reason"]))

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [
        "# ONNX int8 export: every path tried, verified in onnxruntime",
        "",
        f"Model `{a.model}`, text `{Path(a.text).name}`, first {a.max_tokens:,} tokens, context {a.context} "
        f"({torch_numbers['tokens_scored']:,} tokens scored, BOS as unscored context); decode: prompt "
        f"{settings.prompt_tokens} tokens, {settings.new_tokens} greedy tokens with the KV cache, median of "
        f"{settings.repeats} after a warm-up. onnxruntime {_version('onnxruntime')}, torch {_version('torch')}, "
        f"{platform.machine()}, {os.cpu_count()} cores (load average {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end: the machine was shared, so speeds are indicative). {minutes:.0f} min.",
        "",
        f"Acceptance (core/export/onnx.py): verified ppl <= {INT8_PPL_LIMIT}x the torch fp32 ppl and model "
        f"files <= {INT8_SIZE_LIMIT}x the fp32 ONNX export; of the paths that pass, those within 1 % of "
        "the best ppl (the 1 % parity limit), the fastest decoder. Ratios below: ppl vs torch fp32, size vs the fp32 ONNX file, "
        "decode vs torch fp32 measured in the same run. On a busy machine torch's OpenMP threads lose "
        "more than onnxruntime's (set not to busy-wait), so trust decode ratios only from a quiet one.",
        "",
        "| path | method | ppl | x fp32 ppl | size MB | x fp32 size | prefill tok/s | decode tok/s | x torch decode | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, method, ppl, size, pre_onnx, pre_t, dec, verdict in rows:
        pre = pre_onnx if pre_onnx is not None else pre_t
        lines.append(f"| {name} | {method} | {f(ppl, '.3f')} | {f(ppl / p_t if ppl else None, '.3f')} | "
                     f"{f(size / 1e6 if size else None, '.1f')} | {f(size / fs if size else None, '.3f')} | "
                     f"{f(pre, '.0f')} | {f(dec, '.1f')} | {f(dec / d_t if dec else None, '.2f')} | {verdict} |")
    lines += ["", f"Chosen by the export: **{q['quant_path']}**" if q["ok"] else f"No path passed: {q['failure']}",
              "", "Produced by:", "", "```", command, "```", ""]
    Path(a.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0 if q["ok"] and fp32["ok"] else 1


def _rel(p: str) -> str:
    try:
        return str(Path(p).absolute().relative_to(ROOT))
    except ValueError:
        return p


def _version(pkg: str) -> str:
    from importlib.metadata import version
    return version(pkg)


if __name__ == "__main__":
    sys.exit(main())
