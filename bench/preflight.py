"""Preflight's RAM estimate against the measured peak RSS, for every built-in technique on the
bundled model: each technique alone with its default settings, run as the app runs it (a worker
process; the job's payload carries the estimate made before it started and the peak RSS measured
in it). A fresh home, so no ledger history corrects the estimate: this is the raw model.

    .venv/bin/python bench/preflight.py [--only gptq,awq] [--max-tokens 1024]

Bar (issue 7): within ±25 % of the measured peak RSS for every built-in technique.
Rewrites the "preflight" section of bench/RESULTS.md (with --only, prints only).
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

os.environ["SQUEEZE_HOME"] = str(isolated_home("squeeze-preflight-"))

from core.evaluate import EvalSettings  # noqa: E402
from core.jobs.client import WorkerJob  # noqa: E402
from core.jobs.spec import JobSpec  # noqa: E402
from core.ledger import Ledger  # noqa: E402
from core.techniques import all_techniques  # noqa: E402

SHORTER = {"distill": {"steps": 20}}  # RAM does not grow with training steps: keep the bench short


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated technique names")
    ap.add_argument("--max-tokens", type=int, default=1024)
    a = ap.parse_args()
    ev = dict(EvalSettings().to_dict(), max_tokens=a.max_tokens, repeats=1)
    names = [t.name for t in all_techniques()]
    if a.only:
        names = [n for n in names if n in a.only.split(",")]
    rows, worst = [], 0.0
    for name in ["baseline"] + names:
        steps = [] if name == "baseline" else [{"technique": name, **SHORTER.get(name, {})}]
        events: list[dict] = []
        t0 = time.monotonic()
        WorkerJob(JobSpec(MODEL, recipe={"steps": steps}, eval=ev), events.append, Ledger()).start().wait(3600)
        res = next((e["payload"] for e in events if e["type"] == "result"), None)
        if res is None:
            err = next((e["message"] for e in events if e["type"] == "error"), "no result")
            rows.append(f"| {name} | — | — | — | failed: {err[:80]} |")
            print(rows[-1], flush=True)
            continue
        est, peak = res["preflight"]["raw_ram_bytes"], res["peak_rss_bytes"]
        err = est / peak - 1
        worst = max(worst, abs(err))
        rows.append(f"| {name} | {est / 1e9:.2f} GB | {peak / 1e9:.2f} GB | {err:+.0%} | "
                    f"{'ok' if abs(err) <= 0.25 else 'outside ±25 %'} ({time.monotonic() - t0:.0f} s) |")
        print(rows[-1], flush=True)
    body = f"""## Preflight RAM estimate vs measured peak RSS (issue 7)

Command: `.venv/bin/python bench/preflight.py --max-tokens {a.max_tokens}` — every built-in technique alone with
its default settings on the bundled model (distill with 20 steps: its memory does not grow with steps), each a job
in a worker process; evaluation as the app's default but {a.max_tokens:,} tokens and one decode repeat. The
estimate is preflight's raw one (fresh home: no ledger history to correct it), made before the job started.
Bar: within ±25 %.

| recipe | estimate | peak RSS | error | |
|---|---|---|---|---|
""" + "\n".join(rows) + f"""

Worst error: **{worst:.0%}**.
"""
    print(body)
    if not a.only:
        write_section("preflight", body)


if __name__ == "__main__":
    main()
