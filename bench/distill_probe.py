"""Quick distill probes after issue 5's 25 % layer prune, in one process: the prune (or a hand-picked set of
layers) then a short distill per variant, perplexity on the first N tokens of WikiText-2 test beside fp32.
In memory, not saved and loaded back: a tool to rank settings before a full run of bench/calibrated.py.

    .venv/bin/python bench/distill_probe.py --max-tokens 4096 --steps 40 '{}' '{"lr": 5e-4}' \\
        '{"hidden_mse": 3}' '{"drop": [11, 12, 13, 14, 15, 16, 17, 18]}'

Each variant is distill's settings as JSON over 2 x 512-token windows from the whole validation split;
"drop" replaces the prune's choice of layers by the listed ones. Prints one JSON line per variant.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

from common import MODEL, TEXT, VALID, isolated_home  # noqa: E402 (repo root on sys.path)


def drop_layers(model, drop: list[int]):
    """A copy of `model` without the decoder layers in `drop` (structured_prune's own surgery)."""
    from core.techniques.architecture import keep_only_layers
    s = copy.deepcopy(model)
    keep_only_layers(s, [i for i in range(s.config.num_hidden_layers) if i not in drop])
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("variants", nargs="+", help="distill settings as JSON; 'drop': layers to remove by hand")
    a = ap.parse_args()
    os.environ.setdefault("SQUEEZE_HOME", str(isolated_home()))

    from core import models
    from core.evaluate import perplexity
    from core.techniques import registry
    from core.techniques.base import StepContext

    def ppl(m) -> float:
        m.eval()
        return perplexity(m, tok, TEXT, a.max_tokens, a.context)["ppl"]

    teacher, tok, _ = models.load(MODEL)
    base = ppl(teacher)
    print(json.dumps({"fp32": round(base, 3)}), flush=True)
    prune = registry.get("structured_prune")
    pruned = copy.deepcopy(teacher)
    prune.apply(pruned, prune.make({"layers": 0.25, "heads": 0.0, "ffn": 0.0}), StepContext(tokenizer=tok))
    gone = [i for i in range(teacher.config.num_hidden_layers)
            if i not in [layer.teacher_layer for layer in pruned.model.layers]]
    distill = registry.get("distill")
    for spec in a.variants:
        over = json.loads(spec)
        drop = over.pop("drop", gone)
        student = drop_layers(teacher, drop)
        alone = ppl(student)
        ctx = StepContext(tokenizer=tok, state_key=f"probe {spec}")
        ctx.base_model = lambda: teacher
        cfg = distill.make({"steps": a.steps, "samples": 256, "seq_len": 512, "batch_size": 2,
                            "calib_text": str(VALID), "checkpoint_every": 1000, "minutes": 0, **over})
        t0 = time.perf_counter()
        r = distill.apply(student, cfg, ctx)
        after = ppl(student)
        losses = r["losses"]
        print(json.dumps({"variant": spec, "layers_removed": drop, "alone_x": round(alone / base, 3),
                          "ppl": round(after, 3), "x_fp32": round(after / base, 4),
                          "seconds": round(time.perf_counter() - t0), "s_per_step": r["seconds_per_step"],
                          "loss_every_eighth": [round(v, 3) for v in losses[::max(1, len(losses) // 8)]]}),
              flush=True)


if __name__ == "__main__":
    main()
