"""The sensitivity scan on the bundled model as the app runs it (a worker process): all 30 layers ×
7 modules for rtn 4-bit g64, 4,096 tokens of the app's evaluation text; the job's ETA after 10 %
of the scan against the time it really took; then mixed precision from that scan at a size budget,
run and measured against uniform rtn 4-bit and 8-bit in the same process.

    .venv/bin/python bench/sensitivity.py [--budget-fraction 0.25] [--precision auto]
    .venv/bin/python bench/sensitivity.py --agreement 1024   # fp32 vs bf16 scans, same process

Bars (issue 7): scan ≤ 10 min on 2 cores, ETA within ±25 % after 10 % progress.
Rewrites the "sensitivity" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, isolated_home  # noqa: E402
from results_md import write_section  # noqa: E402

os.environ["SQUEEZE_HOME"] = str(isolated_home("squeeze-sens-"))

from core.evaluate import EvalSettings  # noqa: E402
from core.jobs.client import WorkerJob  # noqa: E402
from core.jobs.spec import JobSpec  # noqa: E402
from core.ledger import Ledger  # noqa: E402
from core.mixed_precision import allocate, summary  # noqa: E402


def run(spec: JobSpec) -> tuple[dict, list[tuple[float, dict]], float]:
    events: list[tuple[float, dict]] = []
    t0 = time.monotonic()
    WorkerJob(spec, lambda e: events.append((time.monotonic() - t0, e)), Ledger()).start().wait(3600)
    res = next((e for _, e in events if e["type"] == "result"), None)
    if res is None:
        err = next((e for _, e in events if e["type"] == "error"), {"message": "no result"})
        raise SystemExit(f"{spec.kind} failed: {err['message']}")
    return res["payload"], events, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-fraction", type=float, default=0.25,
                    help="budget between all-4-bit (0) and all-8-bit (1) sizes; 0.25 is the app's first offer")
    ap.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--agreement", type=int, metavar="TOKENS", help="compare fp32 and bf16 scans instead")
    a = ap.parse_args()
    if a.agreement:
        return agreement(a.agreement)
    ev = EvalSettings().to_dict()
    scan, events, total = run(JobSpec(MODEL, kind="sensitivity", eval=ev, compare={
        "technique": "rtn", "setting": 4, "group_size": 64, "precision": a.precision}))
    prog = [(t, e) for t, e in events if e["type"] == "progress" and e["stage"] == "scan"]
    t10, e10 = next((t, e) for t, e in prog if e["fraction"] >= 0.10)
    predicted, actual = t10 + e10["eta_s"], total
    err = (predicted - actual) / actual
    cells = sum(v is not None for row in scan["delta_pct"] for v in row)
    worst = sorted(((v, i, m) for i, row in enumerate(scan["delta_pct"]) for m, v in zip(scan["modules"], row)
                    if v is not None), reverse=True)[:5]
    print(f"scan {total:.0f} s, ETA at 10 %: {predicted:.0f} s ({err:+.0%})", flush=True)

    from core.mixed_precision import size_range
    low, high = size_range(scan)
    budget = (low + a.budget_fraction * (high - low)) / 1e6
    alloc = allocate(scan, budget)
    rows = []
    for name, recipe in (("rtn 4-bit g64, every Linear", {"steps": [{"technique": "rtn", "bits": 4, "group_size": 64}]}),
                         (f"mixed: {len(alloc['upgrade'])} Linears at 8 bits, rest 4-bit g64", alloc["recipe"]),
                         ("rtn 8-bit g64, every Linear", {"steps": [{"technique": "rtn", "bits": 8, "group_size": 64}]}),
                         ("fp32 baseline", {"steps": []})):
        p, _, dt = run(JobSpec(MODEL, recipe=recipe, eval=ev))
        rows.append((name, p["ppl"], p["size_bytes"]))
        print(name, round(p["ppl"], 3), p["size_bytes"], flush=True)
    base = rows[-1][1]
    table = "\n".join(f"| {n} | {ppl:.3f} | {ppl / base:.3f}× | {size / 1e6:,.1f} MB |" for n, ppl, size in rows)
    body = f"""## Sensitivity scan and mixed precision (issue 7)

Command: `.venv/bin/python bench/sensitivity.py --budget-fraction {a.budget_fraction}` — the app's sensitivity job
in a worker process on the bundled model: rtn 4-bit g64 applied to one Linear at a time ({scan.get('precision', 'fp32')}), {cells} cells
({scan['layers']} layers × {len(scan['modules'])} modules), {scan['tokens']:,} tokens of the app's default
evaluation text (context {ev['context']}).

| | measured | bar |
|---|---|---|
| scan, start to result (model load included) | **{total / 60:.1f} min** ({scan['seconds']:.0f} s in the scan itself) | ≤ 10 min |
| ETA after 10 % of the scan (elapsed + ETA shown) | {predicted:.0f} s vs {actual:.0f} s actual: **{err:+.0%}** | ±25 % |

Most sensitive: {', '.join(f'layer {i} {m} +{v:.2f} %' for v, i, m in worst)}.

Mixed precision from this scan at a {budget:,.1f} MB budget ({a.budget_fraction:.0%} of the way from all-4-bit
to all-8-bit; `squeeze sensitivity … --budget-mb {budget:.1f}`): {summary(alloc)}. Measured, same evaluation:

| recipe | ppl | × fp32 | size on disk |
|---|---|---|---|
{table}
"""
    write_section("sensitivity", body)


def agreement(tokens: int) -> None:
    """The same scan in fp32 and in bf16 (same process, same text): time and how far the maps agree."""
    from core import models, paths
    from core.sensitivity import scan
    model, tok, _ = models.load(MODEL)
    out = {}
    for prec in ("bf16", "fp32"):
        t0 = time.perf_counter()
        out[prec] = (scan(model, tok, paths.default_eval_text(), "rtn", 4, tokens, 512, 64, precision=prec),
                     time.perf_counter() - t0)
        print(prec, round(out[prec][1]), "s", flush=True)
    cells = {p: [v for row in out[p][0]["delta_pct"] for v in row] for p in out}
    f, b = cells["fp32"], cells["bf16"]

    def ranks(xs):
        order = sorted(range(len(xs)), key=xs.__getitem__)
        r = [0] * len(xs)
        for k, i in enumerate(order):
            r[i] = k
        return r
    rf, rb = ranks(f), ranks(b)
    n = len(f)
    spearman = 1 - 6 * sum((x - y) ** 2 for x, y in zip(rf, rb)) / (n * (n * n - 1))
    top = lambda xs: set(sorted(range(n), key=xs.__getitem__, reverse=True)[:10])  # noqa: E731
    overlap = len(top(f) & top(b))
    diff = max(abs(x - y) for x, y in zip(f, b))
    body = f"""## Sensitivity scan in bf16 vs fp32 (issue 7)

Command: `.venv/bin/python bench/sensitivity.py --agreement {tokens}` — the rtn 4-bit g64 scan of the bundled model
(210 cells, {tokens:,} tokens of the app's evaluation text, context 512) twice in one process: matmuls in bf16
(torch.autocast; this CPU has AMX / AVX-512 BF16) and in fp32.

| | fp32 | bf16 |
|---|---|---|
| scan time | {out['fp32'][1]:.0f} s | {out['bf16'][1]:.0f} s ({out['fp32'][1] / out['bf16'][1]:.1f}× faster) |
| base perplexity | {out['fp32'][0]['base_ppl']:.3f} | {out['bf16'][0]['base_ppl']:.3f} |

Agreement of the 210 cells (Δ perplexity %): Spearman rank correlation **{spearman:.3f}**, the ten most sensitive
Linears {overlap}/10 the same, largest difference {diff:.2f} points (fp32 range {min(f):.2f} … {max(f):.2f} %).
"""
    print(body)
    write_section("sensitivity-precision", body)


if __name__ == "__main__":
    main()
