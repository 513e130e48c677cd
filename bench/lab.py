"""Teaching mode's guided lab, start to finish on the bundled model, as a student runs it in the
app: every step a job in its own worker process (as the GUI starts them), the app's default
evaluation settings (the shipped WikiText-2 slice, 4,096 tokens, context 512), default technique
settings. The lab's checklist (core.lab.progress over the ledger) must tick every step.

    .venv/bin/python bench/lab.py

Bar (issue 7): ≤ 30 minutes on 2 cores. Rewrites the "lab" section of bench/RESULTS.md.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, isolated_home  # noqa: E402
from results_md import write_section  # noqa: E402

os.environ["SQUEEZE_HOME"] = str(isolated_home("squeeze-lab-"))

from core import lab  # noqa: E402
from core.evaluate import EvalSettings  # noqa: E402
from core.jobs.client import WorkerJob  # noqa: E402
from core.jobs.spec import JobSpec  # noqa: E402
from core.ledger import Ledger  # noqa: E402


def run(spec: JobSpec) -> tuple[dict, float]:
    events: list[dict] = []
    t0 = time.monotonic()
    WorkerJob(spec, events.append, Ledger()).start().wait(3600)
    dt = time.monotonic() - t0
    res = next((e for e in events if e["type"] == "result"), None)
    if res is None:
        err = next((e for e in events if e["type"] == "error"), {"message": "no result"})
        raise SystemExit(f"{spec.kind} {spec.recipe} failed: {err['message']}")
    return res["payload"], dt


def main() -> None:
    ev = EvalSettings().to_dict()
    rows, total, payloads = [], 0.0, {}
    steps = [("baseline", {"steps": []}),
             ("int8", {"steps": [{"technique": "rtn", "bits": 8, "group_size": 0}]}),
             ("int4", {"steps": [{"technique": "rtn", "bits": 4, "group_size": 64}]}),
             ("gptq", {"steps": [{"technique": "gptq", "bits": 4, "group_size": 64}]}),
             ("prune", {"steps": [{"technique": "wanda", "sparsity": 0.5}]})]
    for key, recipe in steps:
        p, dt = run(JobSpec(MODEL, recipe=recipe, eval=ev))
        payloads[key] = p
        total += dt
        rows.append(f"| {key} | {p['label']} | {p['ppl']:.2f} | {p['size_bytes'] / 1e6:,.0f} MB | {dt:.0f} s |")
        print(rows[-1], flush=True)
    ref, var = payloads["baseline"], payloads["gptq"]
    p, dt = run(JobSpec(MODEL, kind="compare", eval=ev, compare={
        "prompt": "The history of the city begins", "new_tokens": 24,
        "reference": {"label": ref["label"], "variant_dir": ref.get("variant_dir")},
        "variant": {"label": var["label"], "variant_dir": var["variant_dir"]}}))
    total += dt
    rows.append(f"| compare | baseline vs gptq, 24 tokens | | | {dt:.0f} s |")
    print(rows[-1], flush=True)
    out = Path(os.environ["SQUEEZE_HOME"]) / "export-int4"
    p, dt = run(JobSpec(MODEL, recipe=steps[3][1], eval=ev, kind="export",
                        export={"out": str(out), "quantize": "int4", "opset": None,
                                "variant_dir": var["variant_dir"]}))
    total += dt
    rows.append(f"| export | gptq → ONNX int4, verified ({'ok' if p.get('ok', True) else 'FAILED'}) | "
                f"{p['ppl_onnx']:.2f} | {p['size_bytes'] / 1e6:,.0f} MB | {dt:.0f} s |")
    print(rows[-1], flush=True)
    ticked = lab.progress(Ledger().rows())
    body = f"""## Teaching mode's lab, start to finish (issue 7)

Command: `.venv/bin/python bench/lab.py` — the seven lab steps on the bundled model, each a job in its own worker
process as the app runs them, with the app's default evaluation settings ({ev['max_tokens']:,} tokens of the
shipped WikiText-2 slice, context {ev['context']}, decode {ev['new_tokens']} tokens × {ev['repeats']}) and default
technique settings. Bar: ≤ 30 min on 2 cores.

| step | what ran | ppl | size | time |
|---|---|---|---|---|
""" + "\n".join(rows) + f"""

**Total {total / 60:.1f} min** (bar 30). The lab checklist, read from the ledger as teaching mode reads it, ticked
{sum(ticked.values())} of {len(ticked)} steps{'' if all(ticked.values()) else ': missing ' + ', '.join(k for k, v in ticked.items() if not v)}.
"""
    write_section("lab", body)


if __name__ == "__main__":
    main()
