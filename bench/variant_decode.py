"""Decode speed of saved variants beside torch fp32, in interleaved rounds (issue 5's "decode ≥ 1.25×
faster"): every model loaded once, then each round measures fp32 and every variant one after the other,
so each ratio divides numbers taken within a minute of each other on a shared machine. The engine's
decode_speed (KV cache, greedy, one warm-up, median of repeats) on the app's evaluation text.

    .venv/bin/python bench/variant_decode.py VARIANT_DIR [...] [--rounds 5] [--new-tokens 128]
"""
from __future__ import annotations

import argparse
import json
import statistics

from common import MODEL, TEXT  # noqa: E402 (repo root on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+", help="saved variant folders (workspace/variants/<id>)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    from core import evaluate as ev
    from core import models

    loaded = {"fp32": models.load(MODEL)[:2]}
    for v in a.variants:
        loaded[v] = models.load(v)[:2]
    speeds: dict[str, list[float]] = {k: [] for k in loaded}
    for r in range(a.rounds):
        for k, (m, tok) in loaded.items():
            m.eval()
            speeds[k].append(ev.decode_speed(m, tok, TEXT, a.prompt_tokens, a.new_tokens,
                                             a.repeats)["decode_tokens_per_s"])
        ratios = [speeds[k][-1] / speeds["fp32"][-1] for k in a.variants]
        print(f"round {r + 1}: fp32 {speeds['fp32'][-1]:.1f} tok/s; × fp32: "
              + ", ".join(f"{x:.2f}" for x in ratios), flush=True)
    for k in a.variants:
        per_round = [s / b for s, b in zip(speeds[k], speeds["fp32"])]
        print(json.dumps({"variant": k, "decode_tok_s_median": round(statistics.median(speeds[k]), 1),
                          "fp32_tok_s_median": round(statistics.median(speeds["fp32"]), 1),
                          "x_fp32_median_of_rounds": round(statistics.median(per_round), 3),
                          "x_fp32_range": [round(min(per_round), 3), round(max(per_round), 3)]}))


if __name__ == "__main__":
    main()
