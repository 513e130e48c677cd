"""The sensitivity map (core/sensitivity.py through a sensitivity job): Δ perplexity per Linear,
equal to compressing that Linear alone in the full model; `exclude` keeps Linears out."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from core.jobs.client import run_inline
from core.jobs.spec import JobSpec


def scan(tiny_model, tiny_eval, technique, setting, cancelled=lambda: False):
    return run_inline(JobSpec(model=tiny_model, kind="sensitivity", eval=tiny_eval,
                              compare={"technique": technique, "setting": setting}), cancelled=cancelled)


def test_each_cell_is_the_perplexity_change_of_compressing_that_linear_alone(tiny_model, tiny_eval, home):
    rec = scan(tiny_model, tiny_eval, "rtn", 2)
    assert rec.outcome == "done", rec.error
    r = rec.result
    assert r["layers"] == 2 and r["modules"][0] == "q_proj" and len(r["delta_pct"][0]) == 7
    assert all(v is not None for row in r["delta_pct"] for v in row)
    # cross-check one cell against the plain evaluation of the full model with that Linear at 2 bits
    from core import models
    from core.evaluate import perplexity
    from core.sensitivity import perturb
    model, tok, _ = models.load(tiny_model)
    base = perplexity(model, tok, Path(tiny_eval["text"]), tiny_eval["max_tokens"], tiny_eval["context"])["ppl"]
    lin = model.model.layers[1].mlp.down_proj
    lin.weight.data.copy_(perturb(lin.weight.data, "rtn", 2))
    one = perplexity(model, tok, Path(tiny_eval["text"]), tiny_eval["max_tokens"], tiny_eval["context"])["ppl"]
    assert r["base_ppl"] == pytest.approx(base, rel=1e-4)
    assert r["delta_pct"][1][6] == pytest.approx((one / base - 1) * 100, abs=1e-3)


def test_nothing_pruned_changes_nothing_and_a_scan_cancels(tiny_model, tiny_eval, home):
    r = scan(tiny_model, tiny_eval, "magnitude_prune", 0.0).result
    assert max(abs(v) for row in r["delta_pct"] for v in row) < 1e-9 and math.isfinite(r["base_ppl"])
    calls = {"n": 0}

    def cancel_soon():
        calls["n"] += 1
        return calls["n"] > 5
    assert scan(tiny_model, tiny_eval, "rtn", 4, cancel_soon).outcome == "cancelled"


def test_excluded_linears_stay_float(tiny_model, tiny_eval, home):
    from core.variant import load_variant, read_manifest
    rec = run_inline(JobSpec(model=tiny_model, eval=tiny_eval, recipe={"steps": [
        {"technique": "rtn", "bits": 4, "group_size": 32, "exclude": "layers.0.mlp.down_proj, layers.1.self_attn.q_proj"}]}))
    assert rec.outcome == "done", rec.error
    packed = read_manifest(rec.result["variant_dir"])["packed"]
    assert len(packed) == 2 * 7 - 2
    assert "model.layers.0.mlp.down_proj.weight" not in packed and "model.layers.1.mlp.down_proj.weight" in packed
    from core import models
    base, _, _ = models.load(tiny_model)
    v, _ = load_variant(rec.result["variant_dir"])
    assert (v.model.layers[0].mlp.down_proj.weight == base.model.layers[0].mlp.down_proj.weight).all()
