"""Decode speed of every export of a `peers.py --onnx` run, re-measured in interleaved rounds beside
torch fp32 eager (issue 6).

Why: on this shared machine the same int4 file decoded at 131.7 tok/s in one deployment run and
116.5 in the next, 30 minutes apart, while torch fp32 held at 30 tok/s in both; the table's ratios
divide one row's moment by another's. Here each round measures torch fp32 and then every file, one
after the other, so every ratio compares numbers taken within a minute of each other; the table
keeps each row's median and range over rounds. The roofline's copy bandwidth is measured again in
every round too, so each round's "% of roofline" divides two numbers taken together.

    .venv/bin/python bench/decode_rounds.py [--runs /tmp/squeeze-peers-onnx-XXXX] [--rounds 5]

(the files: a `peers.py --onnx` run, or `peers.py --onnx --exports-only --max-tokens 1024`)
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
from pathlib import Path

from common import MODEL, TEXT  # noqa: E402 (repo root on sys.path)

PROMPT, NEW, REPEATS = 128, 128, 3   # the deployment table's protocol: 128 greedy tokens after 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", help="the folder a peers.py --onnx run exported into (default: the newest)")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    runs = Path(a.runs or max(glob.glob("/tmp/squeeze-peers-onnx-*"), key=os.path.getmtime))
    files = {p.parent.name: p for p in sorted(runs.glob("*/model.onnx")) if p.parent.name.startswith("ONNX")}
    if not files:
        raise SystemExit(f"no exports of ours in {runs}: run bench/peers.py --onnx first")

    from core import evaluate as ev
    from core import models, roofline
    from core.export import ort_runner as rt
    from results_md import fmt_table, write_section

    fp, tok, _ = models.load(MODEL)
    prompt = tok(ev.read_text(TEXT), add_special_tokens=False)["input_ids"][:PROMPT]
    lms = {name: rt.CausalLM(f) for name, f in files.items()}
    speeds: dict[str, list[float]] = {"torch fp32 eager": [], **{n: [] for n in files}}
    bws: list[float] = []
    for r in range(a.rounds):
        bws.append(roofline.measure_bandwidth())
        speeds["torch fp32 eager"].append(ev.decode_speed(fp, tok, TEXT, PROMPT, NEW, REPEATS)["decode_tokens_per_s"])
        for name, lm in lms.items():
            speeds[name].append(rt.decode_speed(lm, prompt, NEW, REPEATS)["decode_tokens_per_s"])
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in speeds.items()), file=sys.stderr, flush=True)

    ref = speeds["torch fp32 eager"]
    per_token = {"torch fp32 eager": roofline.torch_bytes_per_token(fp),
                 **{n: roofline.onnx_bytes_per_token(f) for n, f in files.items()}}
    rows = []
    for name, v in speeds.items():
        per_round = [x / t for x, t in zip(v, ref)]  # each round's ratio: the two numbers a minute apart
        roof = [x * per_token[name] / bw for x, bw in zip(v, bws)]  # each round's share of its own bound
        rows.append([name.replace("-", " ").replace(" pct", " %"), f"{statistics.median(v):.1f}", f"{max(v):.1f}",
                     f"{statistics.median(per_round):.2f}×", f"{min(per_round):.2f}× – {max(per_round):.2f}×",
                     f"{per_token[name] / 1e6:.0f}", f"{statistics.median(roof) * 100:.0f} %",
                     f"{min(roof) * 100:.0f} % – {max(roof) * 100:.0f} %"])
    body = f"""## Decode speed in interleaved rounds (issue 6)

Command: `.venv/bin/python bench/decode_rounds.py --rounds {a.rounds}` (the files of the run in
`{runs.name}`; each round measures the copy bandwidth, torch fp32 eager, then every file: 128 greedy tokens after a
128-token prompt, median of {REPEATS} after a warm-up, as the deployment table does). Ratio = the file's decode over
torch fp32's in the same round; % roofline = the file's decode × weight bytes read per token over the bandwidth
measured in the same round ({min(bws) / 1e9:.1f}–{max(bws) / 1e9:.1f} GB/s). Median over rounds and the range.

{fmt_table(["export", "decode tok/s (median)", "best round", "× torch fp32 (median of rounds)", "range", "MB/tok",
            "% roofline (median of rounds)", "% roofline (range)"], rows)}
"""
    write_section("decode-rounds", body)
    print(body)


if __name__ == "__main__":
    main()
