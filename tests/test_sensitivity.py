"""The sensitivity map (core/sensitivity.py through a sensitivity job): Δ perplexity per Linear,
equal to compressing that Linear alone in the full model; `exclude` keeps Linears out."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from core.jobs.client import run_inline
from core.jobs.spec import JobSpec


def scan(tiny_model, tiny_eval, technique, setting, cancelled=lambda: False, precision="fp32"):
    return run_inline(JobSpec(model=tiny_model, kind="sensitivity", eval=tiny_eval, compare={
        "technique": technique, "setting": setting, "precision": precision}), cancelled=cancelled)


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


def test_an_exclude_that_matches_no_linear_fails_instead_of_excluding_nothing(tiny_model, tiny_eval, home):
    rec = run_inline(JobSpec(model=tiny_model, eval=tiny_eval, recipe={"steps": [
        {"technique": "rtn", "bits": 4, "exclude": "layers.0.mlp.down_proj, layrs.1.mlp.up_proj"}]}))
    assert rec.outcome == "failed" and "'layrs.1.mlp.up_proj' matches no Linear" in rec.error[1]


def test_mixed_precision_for_a_budget_fits_it_and_beats_uniform_low_bits(tiny_model, tiny_eval, home):
    from core.errors import SqueezeError
    from core.mixed_precision import allocate, size_range
    r = scan(tiny_model, tiny_eval, "rtn", 2).result
    low, high = size_range(r)
    budget = low + 0.3 * (high - low)
    alloc = allocate(r, budget / 1e6)
    assert 0 < len(alloc["upgrade"]) < 14 and alloc["size_mb"] * 1e6 <= budget
    # the Linears kept at 8 bits are the ones that hurt most per byte: none left behind hurts more
    # than an upgraded Linear of the same shape
    cells = {f"layers.{i}.{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}": (v, tuple(r["shapes"][i][k]))
             for i, row in enumerate(r["delta_pct"]) for k, (m, v) in enumerate(zip(r["modules"], row))}
    for name, (v, shape) in cells.items():
        if name not in alloc["upgrade"]:
            assert all(v <= cells[u][0] for u in alloc["upgrade"] if cells[u][1] == shape)
    with pytest.raises(SqueezeError, match="raise the budget"):
        allocate(r, low / 1e6 * 0.9)
    # a budget for everything: the Linears the scan found harmless stay low, and the summary says why
    from core.mixed_precision import summary
    everything = allocate(r, high / 1e6 * 1.01)
    harmless = sum(v <= 0 for v, _ in cells.values())
    assert len(everything["upgrade"]) == 14 - harmless and everything["harmless"] == harmless
    assert (f"{harmless} Linears stay at 2 bits" in summary(everything)) == (harmless > 0)
    # measured on the saved variants: the mixed one is bigger by about the predicted bytes and better
    uni = run_inline(JobSpec(model=tiny_model, eval=tiny_eval, recipe={"steps": [
        {"technique": "rtn", "bits": 2, "group_size": 64}]}))
    mix = run_inline(JobSpec(model=tiny_model, eval=tiny_eval, recipe=alloc["recipe"]))
    assert uni.outcome == mix.outcome == "done", (uni.error, mix.error)
    predicted = (alloc["size_mb"] - alloc["low_mb"]) * 1e6
    assert mix.result["size_bytes"] - uni.result["size_bytes"] == pytest.approx(predicted, rel=0.1)
    assert mix.result["ppl"] < uni.result["ppl"]
    assert f"upgrade_8bit={len(alloc['upgrade'])}" in mix.result["label"] or len(alloc["upgrade"]) < 3


def test_the_cli_scans_keeps_the_scan_and_writes_a_mixed_precision_recipe(tiny_model, tiny_eval, home, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT
    from core import recipe
    kept, out = tmp_path / "scan.json", tmp_path / "mixed.yaml"
    args = [sys.executable, "-m", "core.cli", "sensitivity", tiny_model, "--setting", "2", "--text",
            tiny_eval["text"], "--max-tokens", "512", "--context", "128", "-q"]
    r = subprocess.run(args + ["--save", str(kept)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "most sensitive" in r.stdout and json.loads(kept.read_text())["technique"] == "rtn"
    from core.mixed_precision import size_range
    low, high = size_range(json.loads(kept.read_text()))
    r = subprocess.run([sys.executable, "-m", "core.cli", "sensitivity", tiny_model, "--load", str(kept),
                        "--budget-mb", f"{(low + high) / 2e6:.4f}", "--recipe-out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Linears at 8 bits" in r.stdout and f"recipe written to {out}" in r.stdout
    step = recipe.load(out).steps[0]
    assert step.name == "rtn" and step.config.bits == 2 and step.config.upgrade_8bit.count("layers.") >= 1
    r = subprocess.run([sys.executable, "-m", "core.cli", "sensitivity", tiny_model, "--load", str(kept),
                        "--budget-mb", "0.001"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "raise the budget" in r.stderr and "Traceback" not in r.stderr


def test_a_bf16_scan_ranks_the_linears_as_the_fp32_scan_does(tiny_model, tiny_eval, home):
    # bf16 matmuls make the scan ~2x faster where the CPU has them (bench/RESULTS.md); the map must
    # tell the same story: the most sensitive Linears the same, values close
    f = scan(tiny_model, tiny_eval, "rtn", 2).result
    b = scan(tiny_model, tiny_eval, "rtn", 2, precision="bf16").result
    assert f["precision"] == "fp32" and b["precision"] == "bf16"
    fv = [v for row in f["delta_pct"] for v in row]
    bv = [v for row in b["delta_pct"] for v in row]
    top = lambda xs: set(sorted(range(len(xs)), key=xs.__getitem__)[-3:])  # noqa: E731
    assert len(top(fv) & top(bv)) >= 2
    assert max(abs(x - y) for x, y in zip(fv, bv)) < 0.1 * max(abs(x) for x in fv) + 0.5
