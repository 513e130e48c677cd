"""moefy on the bundled SmolLM2-135M: FFN FLOPs per token, perplexity and decode speed of the
routed FFN beside fp32 in the same process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/moefy.py [--max-tokens 4096] [--context 1024]
        [--rows 8:2:activation,8:4:activation,8:2:weights]

Each row (experts:top_k:cluster) is fitted on a fresh copy of the model with moefy's other defaults
(16 x 256 calibration tokens of the shipped validation slice). Writes the "moefy" section of
bench/RESULTS.md (through results_md.write_section) and bench/results/moefy.json.
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
    ap.add_argument("--rows", default="8:2:activation,8:4:activation,8:2:weights")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--oracle", action="store_true",
                    help="what the FFN's own activations allow at a quarter of its neurons (section moefy-oracle)")
    a = ap.parse_args()
    if a.oracle:
        return oracle(a)

    from core import evaluate as ev
    from core import models
    from core.techniques import moefy as mf
    from core.techniques import registry
    from core.techniques.base import StepContext
    from results_md import fmt_table, write_section

    def measure(model, tok):
        p = ev.perplexity(model, tok, TEXT, a.max_tokens, a.context)
        mf.experts_per_token(model)
        s = ev.decode_speed(model, tok, TEXT, 128, a.new_tokens, 3)
        return {"ppl": p["ppl"], "tokens": p["tokens_scored"], "decode": s["decode_tokens_per_s"],
                "decode_experts": mf.experts_per_token(model)}

    model, tok, _ = models.load(MODEL)
    base = measure(model, tok)
    print(f"fp32: {base}", file=sys.stderr, flush=True)
    tech = registry.get("moefy")
    rows, raw = [], []
    for spec in a.rows.split(","):
        e, k, cluster = spec.split(":")
        model, tok, _ = models.load(MODEL)
        t0 = time.time()
        ctx = StepContext(tokenizer=tok, state_key="bench-moefy")
        info = tech.apply(model, tech.make({"experts": int(e), "top_k": int(k), "cluster": cluster}), ctx)
        apply_s = time.time() - t0
        r = measure(model, tok)
        # diagnostics: the same experts with a perfect router (each token's k experts of largest output
        # norm, which computes them all), and the same router without the skipped experts' mean outputs
        states = [layer.mlp._moefy for layer in model.model.layers]
        for st in states:
            st.oracle = True
        r["ppl_oracle_router"] = ev.perplexity(model, tok, TEXT, a.max_tokens, a.context)["ppl"]
        means = [st.mean for st in states]
        for st in states:
            st.oracle, st.mean = False, None
        r["ppl_no_compensation"] = ev.perplexity(model, tok, TEXT, a.max_tokens, a.context)["ppl"]
        for st, m in zip(states, means):
            st.mean = m
        r.update(experts=int(e), top_k=int(k), cluster=cluster, apply_s=apply_s,
                 ffn_flops_ratio=info["ffn_flops_ratio"], router_recall=info["router_recall"])
        raw.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
        bar = "yes" if (r["ffn_flops_ratio"] <= 0.3 and r["ppl"] <= 1.6 * base["ppl"]) else "no"
        rows.append([f"top-{k} of {e}", cluster, f"{r['ffn_flops_ratio']:.3f}×", f"{r['router_recall']:.0%}",
                     f"{r['ppl']:.3f}", f"{r['ppl'] / base['ppl']:.2f}×", f"{r['ppl_no_compensation']:.1f}",
                     f"{r['ppl_oracle_router']:.1f}", f"{r['decode']:.1f}",
                     f"{r['decode'] / base['decode']:.2f}×", f"{apply_s:.0f} s",
                     bar if (int(e), int(k)) == (8, 2) else ""])
    out = HERE / "results" / "moefy.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"fp32": base, "rows": raw}, indent=2))
    body = f"""## MoE-fication (issue 5)

Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/moefy.py --max-tokens {a.max_tokens} --context {a.context} --rows {a.rows}`
(bundled SmolLM2-135M, {base['tokens']:,} tokens of WikiText-2 test, context {a.context}; each row fitted on a
fresh copy with moefy's defaults otherwise — 16 x 256 calibration tokens of the shipped validation slice,
balanced k-means, ridge router on each expert's output norm; fp32 of the same process: ppl
**{base['ppl']:.3f}**, decode {base['decode']:.1f} tok/s ({a.new_tokens} greedy tokens after a 128-token prompt,
KV cache, median of 3). FFN FLOPs = the k experts' share of gate/up/down plus the router, per token,
relative to the dense FFN. "router recall" = share of calibration tokens' true top-k experts (by output
norm) that the router picks; "perfect router" routes each token by its experts' true output norms (all computed:
a diagnostic of what the clustering allows, not a speed-up). The machine was shared with other jobs: speeds are indicative.)

{fmt_table(["row", "clustering", "FFN FLOPs", "router recall", "ppl", "× fp32", "ppl without mean compensation",
            "ppl with a perfect router", "decode tok/s", "× fp32",
            "fit", "bar"], rows)}

Bar (issue 5): top-2 of 8 experts with FFN FLOPs ≤ 0.3× and ppl ≤ 1.6× fp32.
"""
    if not a.no_write:
        write_section("moefy", body)
    print(body)


def oracle(a) -> None:
    """Upper bounds for any MoE-fication of this FFN at top-2 of 8: each token keeps a quarter of the intermediate
    neurons chosen with everything computed (per neuron, by |silu(gate)·up| or by |silu(gate)| alone), or the best
    pair of 8 overlapping neuron sets built from token clusters. None of these saves FLOPs: they say how much a
    quarter of the neurons can carry at all."""
    import itertools

    import torch

    from core import evaluate as ev
    from core import models, paths
    from results_md import fmt_table, write_section
    torch.manual_seed(0)
    model, tok, _ = models.load(MODEL)
    mlps = [layer.mlp for layer in model.model.layers]
    inter = mlps[0].gate_proj.out_features
    keep, size = inter // 4, inter // 8  # top-2 of 8 experts: two experts of `size` neurons, `keep` at most
    rule = {"mask": None}

    def routed(i, mlp):
        def forward(x):
            g = mlp.act_fn(mlp.gate_proj(x))
            h = g * mlp.up_proj(x)  # [batch, seq, inter]
            return mlp.down_proj(h if rule["mask"] is None else h * rule["mask"](i, h, g))
        return forward
    for i, mlp in enumerate(mlps):
        mlp.forward = routed(i, mlp)

    def top_of(score):  # 1 for the `keep` largest entries of each token's score
        return torch.zeros_like(score).scatter_(-1, score.topk(keep, dim=-1).indices, 1.0)

    # token clusters on the calibration slice: k-means of each token's normalised |h| into 8 clusters; a
    # cluster's expert = its `size` neurons of largest mean |h| (experts may share neurons)
    ids = tok(paths.default_calib_text().read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    starts = torch.linspace(0, len(ids) - 257, 32).long()
    hs = [[] for _ in mlps]
    rule["mask"] = lambda i, h, g: hs[i].append(h.detach().abs().reshape(-1, inter)) or 1.0
    with torch.no_grad():
        for s0 in starts:
            model(ids[s0:s0 + 256][None])
    pair_masks = []
    for h in (torch.cat(x) for x in hs):
        xn = h / h.norm(dim=1, keepdim=True)
        cent = xn[torch.randperm(len(xn))[:8]].clone()
        for _ in range(20):
            lab = torch.cdist(xn, cent).argmin(1)
            for j in range(8):
                if (lab == j).any():
                    cent[j] = xn[lab == j].mean(0)
        experts = [(h[lab == j] if (lab == j).any() else h).mean(0).topk(size).indices for j in range(8)]
        m = torch.zeros(28, inter)
        for p, (e1, e2) in enumerate(itertools.combinations(range(8), 2)):
            m[p, experts[e1]] = 1.0
            m[p, experts[e2]] = 1.0
        pair_masks.append(m)
    union = float(torch.stack(pair_masks).sum(-1).mean())

    def best_pair(i, h, g):
        m = pair_masks[i]
        return m[(h.abs() @ m.T).argmax(-1)]
    rows = []
    for what, mask in (("none (dense)", None),
                       ("per token, the quarter of neurons with largest abs(silu(gate)·up)",
                        lambda i, h, g: top_of(h.abs())),
                       ("per token, the quarter with largest abs(silu(gate)) (the gate alone)",
                        lambda i, h, g: top_of(g.abs())),
                       (f"8 experts from token clusters (overlapping, {size} neurons each; a pair covers "
                        f"{union:.0f} on average), the best pair per token", best_pair)):
        rule["mask"] = mask
        p = ev.perplexity(model, tok, TEXT, a.max_tokens, a.context)
        rows.append([what, f"{p['ppl']:.3f}"])
        print(what, p["ppl"], file=sys.stderr, flush=True)
    base = float(rows[0][1])
    rows = [r + [f"{float(r[1]) / base:.3f}×"] for r in rows]
    body = f"""## MoE-fication: what a quarter of the FFN's neurons can carry (issue 5)

Command: `.venv/bin/python bench/moefy.py --oracle --max-tokens {a.max_tokens} --context {a.context}`
(bundled SmolLM2-135M, {a.max_tokens:,} tokens of WikiText-2 test, context {a.context}; token clusters fitted on
32 × 256 tokens of the shipped validation slice. Every row computes the whole FFN and then keeps {keep} of its
{inter} intermediate neurons per token in every layer — top-2 of 8 experts' share — so these are upper bounds on
what a MoE-fication at top-2 of 8 could give without training, not speed-ups.)

{fmt_table(["neurons kept per token", "ppl", "× dense"], rows)}

moefy's own experts (neurons clustered by co-activation, contiguous, disjoint) with a perfect router give ~102×
(section "moefy"). A quarter of the neurons chosen per token carries the FFN well, but no fixed grouping into 8
experts lets two of them hold a token's quarter: the neurons each token needs are spread over the groups.
"""
    if not a.no_write:
        write_section("moefy-oracle", body)
    print(body)


if __name__ == "__main__":
    main()
