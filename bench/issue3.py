"""The end-to-end benchmark: bundled SmolLM2-135M, WikiText-2 test, first 32,768 tokens, context 1024.
fp32, rtn int8 g64, rtn int4 g64 sym, magnitude 50 %, dynamic int8, and the exported ONNX int8:
perplexity, size on disk and decode tok/s, each as a ratio to fp32 measured in this one run.

    .venv/bin/python bench/issue3.py [--max-tokens 32768] [--context 1024]

Writes its section of bench/RESULTS.md and bench/results/issue3.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

RECIPES = [
    ("fp32", []),
    ("rtn int8 g64", [{"technique": "rtn", "bits": 8, "group_size": 64}]),
    ("rtn int4 g64 sym", [{"technique": "rtn", "bits": 4, "group_size": 64, "symmetric": True}]),
    ("magnitude 50 %", [{"technique": "magnitude_prune", "sparsity": 0.5}]),
    ("dynamic int8", [{"technique": "dynamic_int8"}]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--text", default=str(HERE.parent.parent / "shared/data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--no-onnx", action="store_true")
    a = ap.parse_args()

    from core import paths
    user_models = paths.cache_dir() / "models"  # reuse the converted bundled model
    home = Path(tempfile.mkdtemp(prefix="squeeze-bench-"))
    (home / "cache").mkdir()
    (home / "cache" / "models").symlink_to(user_models, target_is_directory=True)
    os.environ["SQUEEZE_HOME"] = str(home)

    from core.jobs.client import run_inline
    from core.jobs.spec import JobSpec

    ev = dict(text=a.text, max_tokens=a.max_tokens, context=a.context, prompt_tokens=128, new_tokens=128, repeats=3)
    rows = []
    for name, steps in RECIPES:
        t0 = time.time()
        r = run_inline(JobSpec(model="bundled:smollm2-135m", recipe={"steps": steps}, eval=ev))
        if r.outcome != "done":
            raise SystemExit(f"{name}: {r.error}")
        res = r.result
        rows.append({"name": name, "recipe": steps, "ppl": res["ppl"], "size_bytes": res["size_bytes"],
                     "theoretical_bytes": res["theoretical_bytes"], "decode": res["decode_tokens_per_s"],
                     "prefill": res["prefill_tokens_per_s"], "tokens": res["tokens_scored"]})
        print(f"{name}: ppl {res['ppl']:.3f} size {res['size_bytes'] / 1e6:.1f} MB decode "
              f"{res['decode_tokens_per_s']:.1f} tok/s ({time.time() - t0:.0f} s)", file=sys.stderr)
        report(rows, a, partial=True)
    if not a.no_onnx:
        out = home / "onnx-int8"
        r = run_inline(JobSpec(model="bundled:smollm2-135m", kind="export", eval=ev,
                               export={"out": str(out), "quantize": "int8"}))
        if r.outcome != "done":
            raise SystemExit(f"onnx int8: {r.error}")
        res = r.result
        rows.append({"name": f"ONNX int8 ({res.get('quant_path')})", "recipe": [], "ppl": res["ppl_onnx"],
                     "size_bytes": res["size_bytes"], "theoretical_bytes": None,
                     "decode": res["decode_tokens_per_s_onnx"], "prefill": res.get("prefill_tokens_per_s_onnx"),
                     "tokens": res.get("tokens_scored_onnx"), "fp32_onnx_bytes": res.get("fp32_size_bytes"),
                     "ok": res.get("ok"), "failure": res.get("failure")})
    report(rows, a, partial=False)


def report(rows: list[dict], a, partial: bool) -> None:
    from results_md import fmt_table, write_section
    base = rows[0]
    table = []
    for r in rows:
        table.append([r["name"], f"{r['ppl']:.3f}", f"{r['ppl'] / base['ppl']:.3f}×",
                      f"{r['size_bytes'] / 1e6:.1f}", f"{r['size_bytes'] / base['size_bytes']:.3f}×",
                      f"{r['theoretical_bytes'] / 1e6:.1f}" if r["theoretical_bytes"] else "–",
                      f"{r['decode']:.1f}", f"{r['decode'] / base['decode']:.2f}×"])
    onnx_note = "".join(
        f"The ONNX int8 file is {r['size_bytes'] / r['fp32_onnx_bytes']:.3f}× the fp32 ONNX export "
        f"({r['fp32_onnx_bytes'] / 1e6:.1f} MB); verification {'passed' if r['ok'] else 'FAILED: ' + str(r['failure'])}.\n"
        for r in rows if r.get("fp32_onnx_bytes"))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "issue3.json").write_text(json.dumps(rows, indent=2))
    body = f"""## End to end (issue 3): SmolLM2-135M, WikiText-2 test

Command: `.venv/bin/python bench/issue3.py --max-tokens {a.max_tokens} --context {a.context}`
(first {a.max_tokens:,} tokens, context {a.context}, BOS + window, {rows[0]['tokens']:,} tokens scored;
decode = 128 greedy tokens after a 128-token prompt, KV cache, median of 3 after a warm-up; all rows in one process.)

{fmt_table(["variant", "ppl", "× fp32", "size on disk MB", "× fp32", "theoretical MB", "decode tok/s", "× fp32"], table)}

Size on disk is the saved file; the ONNX row is the exported, verified file run in onnxruntime.
Magnitude pruning is stored densely: its file does not shrink, only its theoretical size does.
{onnx_note}Load average (1 min) when this table was written: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores —
decode speeds on a shared machine are noisy; the ratios come from one process, one after the other.
""" + ("\n**Partial run: the rows above are all that was measured so far.**\n" if partial else "")
    write_section("issue3", body)
    if not partial:
        print(body)


if __name__ == "__main__":
    main()
