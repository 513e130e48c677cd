"""early_exit on the bundled SmolLM2-135M: perplexity, layers run per token and decode speed along
the threshold range, beside fp32 in the same process.

    .venv/bin/python bench/early_exit.py [--max-tokens 4096] [--context 1024]

The heads are fitted once (early_exit's defaults: calibration from the shipped validation slice);
each threshold is then set on the same model. Writes the "early-exit" section of bench/RESULTS.md
and bench/results/early_exit.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import HERE, MODEL, ROOT, TEXT, isolated_home  # noqa: E402, F401 (repo root on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--thresholds", default="0.6,0.7,0.8,0.9,0.95")
    a = ap.parse_args()

    from core import evaluate as ev
    from core import models
    from core.techniques import early_exit as ee
    from core.techniques import registry
    from core.techniques.base import StepContext
    from results_md import fmt_table, write_section

    model, tok, _ = models.load(MODEL)

    def measure():
        p = ev.perplexity(model, tok, TEXT, a.max_tokens, a.context)
        lw = ee.layers_per_token(model, "window")
        s = ev.decode_speed(model, tok, TEXT, 128, a.new_tokens, 3)
        ld = ee.layers_per_token(model, "decode")
        return {"ppl": p["ppl"], "tokens": p["tokens_scored"], "window_layers": lw, "decode_layers": ld,
                "decode": s["decode_tokens_per_s"]}

    base = measure()
    print(f"fp32: {base}", file=sys.stderr, flush=True)
    t0 = time.time()
    ctx = StepContext(tokenizer=tok, state_key="bench-early-exit")
    tech = registry.get("early_exit")
    info = tech.apply(model, tech.make({}), ctx)
    apply_s = time.time() - t0
    state = model.model._early_exit
    n = state.n_layers
    rows, raw = [], []
    thresholds = [info["recommended_threshold"]] + [float(t) for t in a.thresholds.split(",")]
    for t in thresholds:
        state.threshold = t
        r = measure()
        r["threshold"] = t
        raw.append(r)
        note = "recommended (auto)" if t == info["recommended_threshold"] and r is raw[0] else ""
        rows.append([f"{t:.3f}", note, f"{r['ppl']:.3f}", f"{r['ppl'] / base['ppl']:.3f}×",
                     f"{r['window_layers']:.1f} / {n}", f"{r['decode_layers']:.1f} / {n}", f"{r['decode']:.1f}",
                     f"{r['decode'] / base['decode']:.2f}×"])
        print(json.dumps(r), file=sys.stderr, flush=True)
    orc = oracle(model, tok, info["exit_points"])
    print(json.dumps(orc), file=sys.stderr, flush=True)
    orc_rows = [[f"{r['lambda']:g}", f"{r['mean_kl']:.3f}", f"{r['layers_per_token']:.1f} / {n}",
                 f"{r['cost_speedup']:.2f}×"] for r in orc["rows"]]
    kl_rows = [[str(p), f"{info['calib_mean_kl_per_exit'][p]:.3f}", f"{orc['held_out_kl'][str(p)]:.3f}"]
               for p in info["exit_points"]]
    out = HERE / "results" / "early_exit.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"fp32": base, "info": {k: v for k, v in info.items() if k != "threshold_table"},
                               "rows": raw, "apply_s": apply_s, "oracle": orc}, indent=2))
    body = f"""## Early exit (issue 5)

Command: `.venv/bin/python bench/early_exit.py --max-tokens {a.max_tokens} --context {a.context}`
(bundled SmolLM2-135M, {base['tokens']:,} tokens of WikiText-2 test, context {a.context}; heads fitted once with
early_exit's defaults — exit points {info['exit_points']}, each read through its fitted adapter, {apply_s:.0f} s — on the
shipped validation slice;
fp32 of the same process: ppl **{base['ppl']:.3f}**, decode {base['decode']:.1f} tok/s ({a.new_tokens} greedy tokens after
a 128-token prompt, KV cache, median of 3). Window perplexity takes each position's logits at its exit
but lets later positions see full-depth keys/values, so it is slightly optimistic for token-by-token
decoding; the decode column is real early exit with the skipped layers' KV filled from the exited state.
The machine was shared with other jobs: speeds are indicative.)

{fmt_table(["threshold", "", "ppl", "× fp32", "layers/token (windows)", "layers/token (decode)", "decode tok/s",
            "× fp32"], rows)}

Bar (issue 5): decode ≥ 1.2× faster at ppl ≤ 1.2× fp32, at the threshold the app recommends.

What the adapters buy: the mean KL (nats) from the full model's next-token distribution at each exit, read through
the final norm and LM head — on the calibration windows scored by adapters fitted on the other half of them, and on
{orc['windows']} other windows of the validation slice (runtime adapters):

{fmt_table(["exit after layer", "calibration (cross-fitted)", "held-out"], kl_rows)}

Without adapters these exits are 2–19 nats away (raw layer 15: ~18 nats, layer 29: ~2.3; measured while building
them, 8 held-out windows): the earlier run of this bench (commit ef09421, no adapters) let ~7 % of positions leave at
the recommended threshold for 1.20× perplexity, and no decoded token. Tried before that: heads trained on top-1
agreement with the full model (95 % agreement on calibration): 40× perplexity, since agreeing on the top token says
nothing about the rest of the distribution; hence heads on KL ≤ tolerance.

What even perfect heads could do: on those held-out windows, each token sent to the exit that minimises
cost + λ × KL (cost in decoder-layer units: the layers run, the LM head = 8 layers, an adapter 0.1, each skipped
layer's k/v fill 0.06; the full model costs {n + 8}), the speed-up this cost model predicts:

{fmt_table(["λ", "mean KL (nats)", "layers/token", "predicted speed-up"], orc_rows)}

Where almost no token leaves, the checks at every exit point (adapter, norm and head, 8 per token, in Python
hooks) make decoding slower than the plain model.
So ppl ≤ 1.2× (mean KL ≲ 0.18) allows at most ~1.2× even with an oracle choosing each token's exit; the logistic
heads (a linear function of the adapted state) pick far worse: at threshold 0.5, half the tokens they let out at
layers 19–29 of held-out text were more than 0.1 nats away (measured while building them), and held out they are less sure than in-sample, so the recommendation now simulates each
calibration window with heads fitted on the other half (in-sample heads recommended a threshold that cost 1.53×
with adapters, 2.75× when the adapters were also scored in-sample). **Row not reached.**
"""
    write_section("early-exit", body)
    print(body)


def oracle(model, tok, points: list[int], windows: int = 8, seq_len: int = 256) -> dict:
    """Per-token KL at each exit (runtime adapters) on validation windows the calibration did not use, and
    what the best per-token exit choice would cost and buy under a layer-count cost model."""
    import torch

    from core.calibration import samples, text_path
    from core.techniques import early_exit as ee

    state = model.model._early_exit
    ids = samples(tok, text_path(""), windows, seq_len, seed=777)  # early_exit's own windows use seed 0
    keep, state.threshold = state.threshold, 2.0  # nothing exits: every layer's state is read
    try:
        raw, last = ee.exit_states(model, ids, points)
    finally:
        state.threshold = keep
    kls = {p: [] for p in points}
    with torch.no_grad():
        for b, h_last in enumerate(last):  # position 0 (BOS) left out, as in the adapters' fit
            full = torch.log_softmax(model.lm_head(model.model.norm(h_last[1:])).float(), -1)
            for p in points:
                h = raw[p][b][1:]
                x = state.adapters[p](h) if p in state.adapters else h
                kls[p].append(ee.exit_kl(full, model.lm_head(model.model.norm(x))))
    n = state.n_layers
    K = torch.stack([torch.cat(kls[p]) for p in points] + [torch.zeros(len(torch.cat(kls[points[0]])))])
    cost = torch.tensor([p + 8 + 0.1 + 0.06 * (n - p) for p in points] + [n + 8.0])
    layers = torch.tensor([float(p) for p in points] + [float(n)])
    rows = []
    for lam in (3, 10, 20, 30, 100):
        j = (cost[:, None] + lam * K).argmin(0)
        pick = torch.arange(K.shape[1])
        rows.append({"lambda": lam, "mean_kl": float(K[j, pick].mean()), "layers_per_token": float(layers[j].mean()),
                     "cost_speedup": float((n + 8) / cost[j].mean())})
    return {"windows": windows, "held_out_kl": {str(p): float(K[i].mean()) for i, p in enumerate(points)},
            "rows": rows}


if __name__ == "__main__":
    main()
