"""Architecture techniques (issue 5: structured_prune, low_rank) on the bundled SmolLM2-135M,
WikiText-2 test, context 1024: each row beside the fp32 model measured in the same process.
Every number is that of the saved variant loaded back (run_inline: load, apply, save, load, measure).

    .venv/bin/python bench/architecture.py [--max-tokens 32768] [--rows layers25,ffn30,lowrank80,...]

Writes the "architecture" section of bench/RESULTS.md and bench/results/architecture.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import HERE, MODEL, ROOT, TEXT, eval_settings, isolated_home, run_recipe  # noqa: E402, F401 (repo root on sys.path)

# key, name, what the issue asks (without the distill step that follows in its rows), steps
ROWS = [
    ("layers25", "structured_prune 25 % of layers", "ppl ≤ 1.5× and decode ≥ 1.25× are for prune → distill",
     [{"technique": "structured_prune", "layers": 0.25, "heads": 0.0, "ffn": 0.0}]),
    ("layers25-heal", "structured_prune 25 % of layers + linear_heal (reference)", "—",
     [{"technique": "structured_prune", "layers": 0.25, "heads": 0.0, "ffn": 0.0, "linear_heal": True}]),
    ("ffn30", "structured_prune 30 % FFN channels", "size ≤ 0.8× (ppl ≤ 1.4× is for prune → distill)",
     [{"technique": "structured_prune", "layers": 0.0, "heads": 0.0, "ffn": 0.3}]),
    ("lowrank80", "low_rank keep 80 % of Linear params, activation-aware", "ppl ≤ 1.5×",
     [{"technique": "low_rank", "keep": 0.8, "activation_aware": True, "allocation": "loss"}]),
    ("lowrank80-uniform", "low_rank keep 80 %, activation-aware, the same rank per shape (reference)", "—",
     [{"technique": "low_rank", "keep": 0.8, "activation_aware": True, "allocation": "uniform"}]),
    ("lowrank80-plain", "low_rank keep 80 %, plain SVD (reference)", "—",
     [{"technique": "low_rank", "keep": 0.8, "activation_aware": False, "allocation": "uniform"}]),
    ("heads33", "structured_prune 1/3 of query heads (reference)", "—",
     [{"technique": "structured_prune", "layers": 0.0, "heads": 0.33, "ffn": 0.0}]),
    ("heads33-comp", "structured_prune 1/3 of query heads, compensated (reference)", "—",
     [{"technique": "structured_prune", "layers": 0.0, "heads": 0.33, "ffn": 0.0, "compensate": True}]),
    ("ffn30-comp", "structured_prune 30 % FFN channels, compensated (reference)", "—",
     [{"technique": "structured_prune", "layers": 0.0, "heads": 0.0, "ffn": 0.3, "compensate": True}]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--rows", default="layers25,ffn30,lowrank80", help="comma-separated row keys")
    ap.add_argument("--home", type=Path, default=None, help="SQUEEZE_HOME to use (reuses its calibration cache)")
    ap.add_argument("--speed-rounds", type=int, default=0,
                    help="then decode speed again, the saved variants and fp32 in turn, this many rounds "
                         "(a shared machine's load drifts; alternating cancels most of it)")
    ap.add_argument("--speed-only", action="store_true",
                    help="only the alternating decode speed, of the variants in bench/results/architecture.json")
    a = ap.parse_args()
    if a.speed_only:
        os.environ["SQUEEZE_HOME"] = str(a.home) if a.home else os.environ.get("SQUEEZE_HOME", "")
        saved = json.loads((HERE / "results" / "architecture.json").read_text())
        a.max_tokens = saved["max_tokens"]
        a.rows = saved.get("rows_arg", a.rows)
        by_label = {row[1]: row for row in ROWS}
        done = []
        for r in saved["rows"]:
            key, _, bar, _ = by_label.get(r["label"], ("", "", "", None))
            r.setdefault("variant_dir", find_variant(r["steps"]))
            done.append((r.get("key", key), r["label"], r.get("bar", bar), r))
        speed = interleaved_speed(a, saved["fp32"], done)
        write(a, saved["fp32"], done, speed)
        return


    os.environ["SQUEEZE_HOME"] = str(a.home or isolated_home())
    ev = eval_settings(a)

    def measure(label, steps):
        t0 = time.time()
        res = run_recipe(label, steps, ev)
        out = {"label": label, "steps": steps, "ppl": res["ppl"], "size_bytes": res["size_bytes"],
               "params": res["params"], "decode": res["decode_tokens_per_s"],
               "prefill": res["prefill_tokens_per_s"], "tokens": res["tokens_scored"],
               "apply_s": sum(s.get("seconds", 0) for s in res.get("steps", [])),
               "info": res.get("steps", []), "seconds": round(time.time() - t0, 1),
               "load": os.getloadavg()[0], "variant_dir": res.get("variant_dir")}
        print(f"{label}: ppl {res['ppl']:.3f}, decode {res['decode_tokens_per_s']:.1f} tok/s, "
              f"{res['size_bytes'] / 1e6:.1f} MB ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        return out

    base = measure("fp32", [])
    keys = a.rows.split(",")
    rows = [r for k in keys for r in ROWS if r[0] == k]
    done = []
    for key, name, bar, steps in rows:
        done.append((key, name, bar, {**measure(name, steps), "key": key, "bar": bar}))
        write(a, base, done)
    if a.speed_rounds:
        write(a, base, done, interleaved_speed(a, base, done))


def find_variant(steps: list[dict]) -> str | None:
    """The newest saved variant in the workspace whose recipe has these steps (with their defaults)."""
    from core import paths
    best = None
    for man in (paths.workspace_dir() / "variants").glob("*/squeeze.json"):
        got = json.loads(man.read_text())["recipe"]["steps"]
        if len(got) == len(steps) and all(all(g.get(k) == v for k, v in s.items()) for g, s in zip(got, steps)):
            if best is None or man.stat().st_mtime > best.stat().st_mtime:
                best = man
    return str(best.parent) if best else None


def interleaved_speed(a, base, done) -> dict:
    """label -> (median decode tok/s, ratio to fp32): fp32 and every saved variant loaded once, then
    decode (128-token prompt, 32 new tokens) measured in turn, round after round."""
    import statistics

    from core import evaluate as evm
    from core import models
    from core.variant import load_variant

    rounds = a.speed_rounds or 5
    loaded = {"fp32": models.load(MODEL)[:2]}
    for _k, name, _b, r in done:
        if r.get("variant_dir"):
            loaded[name] = load_variant(Path(r["variant_dir"]))
    got = {name: [] for name in loaded}
    for i in range(rounds):
        for name, (m, tok) in loaded.items():
            got[name].append(evm.decode_speed(m, tok, a.text, 128, 32, 1)["decode_tokens_per_s"])
        print(f"speed round {i + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in got.items()),
              file=sys.stderr, flush=True)
    # contention only ever slows a run down: the best round is the least disturbed one
    ref, ref_best = statistics.median(got["fp32"]), max(got["fp32"])
    return {"rounds": rounds, "samples": got,
            **{n: (statistics.median(v), statistics.median(v) / ref, max(v), max(v) / ref_best)
               for n, v in got.items()}}


def _shape(info: list[dict]) -> str:
    parts = []
    for s in info:
        if s["technique"] == "structured_prune":
            parts.append(f"{s['layers']} layers, {s['heads']}/{s['kv_heads']} heads, FFN {s['ffn']}")
            if s.get("layers_removed"):
                parts.append("removed " + ",".join(str(i) for i in s["layers_removed"]))
        elif s["technique"] == "low_rank":
            ranks = (f"ranks {s['ranks']}" if "ranks" in s else
                     "ranks {} / {} / {} (min / median / max)".format(*s["rank_range"]))
            parts.append(f"{s['factored']} Linears factored ({s['skipped']} dense), {ranks}, "
                         f"{s['kept']:.3f} of Linear params kept")
    return "; ".join(parts)


def write(a, base, done, speed: dict | None = None) -> None:
    from results_md import fmt_table, write_section

    out_json = HERE / "results" / "architecture.json"
    out_json.parent.mkdir(exist_ok=True)
    out_json.write_text(json.dumps({"fp32": base, "rows": [r[3] for r in done], "max_tokens": a.max_tokens,
                                    "rows_arg": a.rows, "speed": speed}, indent=2))
    table = []
    for key, name, bar, r in done:
        alt = (f"{speed[name][0]:.1f} ({speed[name][1]:.2f}×); best {speed[name][2]:.1f} (**{speed[name][3]:.2f}×**)"
               if speed and name in speed else "—")
        table.append([name, bar, f"{r['ppl']:.3f}", f"**{r['ppl'] / base['ppl']:.3f}×**",
                      f"{r['decode']:.1f}", f"{r['decode'] / base['decode']:.2f}×", alt,
                      f"{r['size_bytes'] / 1e6:.1f}", f"**{r['size_bytes'] / base['size_bytes']:.3f}×**",
                      f"{r['params'] / 1e6:.1f}", f"{r['apply_s']:.0f}", _shape(r["info"]),
                      "`" + json.dumps(r["steps"]) + "`"])
    rows = a.rows if a.rows != "layers25,ffn30,lowrank80" else ""
    speed_note = ""
    if speed:
        speed_note = (f"Decode alternating: then `.venv/bin/python bench/architecture.py --speed-only --speed-rounds "
                      f"{speed['rounds']}` loaded fp32 (median {speed['fp32'][0]:.1f}, best {speed['fp32'][2]:.1f} tok/s) and "
                      f"every saved variant once and measured their decode in turn, {speed['rounds']} rounds: median "
                      "and best round (contention only slows a run, so the best is the least disturbed); ratios to "
                      "fp32's median / best.\n")
    body = f"""## Architecture: structured pruning and low rank (issue 5)

Command: `.venv/bin/python bench/architecture.py --max-tokens {a.max_tokens} --context {a.context}{f" --rows {rows}" if rows else ""}`
({base['tokens']:,} tokens of WikiText-2 test scored, context {a.context}, BOS + window; calibration: the
shipped WikiText-2 validation slice, 32 random windows of 512 tokens after BOS; every row in one
process, ratios to the fp32 model of this run: ppl **{base['ppl']:.3f}**, decode {base['decode']:.1f} tok/s
(128-token prompt, 32 new tokens, median of 3), file {base['size_bytes'] / 1e6:.1f} MB, {base['params'] / 1e6:.1f} M
params. Every number is the saved variant's, loaded back. Load average {done[-1][3]['load']:.1f} on the
shared 2-core machine: decode speeds are noisy. The issue's rows for the prunes end in `distill`,
which is not part of this work: these are the prunes alone.)

{speed_note}
{fmt_table(["recipe", "issue asks", "ppl", "× fp32", "decode tok/s", "× fp32", "decode alternating: median; best (× fp32)",
            "size MB", "× fp32",
            "params M", "apply s", "shape", "recipe steps"], table)}
"""
    write_section("architecture", body)
    print(body)


if __name__ == "__main__":
    main()
