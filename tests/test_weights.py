"""Weight views (core/weights.py through a weights job): histograms before/after on shared bins,
bits per weight and sparsity per Linear."""
from __future__ import annotations

import pytest

from core.jobs.client import run_inline
from core.jobs.spec import JobSpec


def view(tiny_model, tiny_eval, steps):
    rec = run_inline(JobSpec(model=tiny_model, recipe={"steps": steps}, eval=tiny_eval))
    assert rec.outcome == "done", rec.error
    v = run_inline(JobSpec(model=tiny_model, kind="weights",
                           compare={"variant_dir": rec.result["variant_dir"], "label": "x"}))
    assert v.outcome == "done", v.error
    return v.result["layers"]


def test_a_2_bit_grid_shows_as_few_spikes_and_its_bits_per_weight(tiny_model, tiny_eval, home):
    layers = view(tiny_model, tiny_eval, [{"technique": "rtn", "bits": 2, "group_size": 0}])
    assert len(layers) == 2 * 7  # every Linear of both decoder layers
    for lay in layers:
        n = lay["shape_before"][0] * lay["shape_before"][1]
        assert len(lay["codes"]) == 4 and sum(lay["codes"]) == n  # the 2-bit grid: four codes, every weight on one
        assert 2.0 < lay["bits"] < 2.6 and lay["sparsity_before"] == 0.0
        assert sum(lay["before"]) == sum(lay["after"]) == lay["shape_before"][0] * lay["shape_before"][1]


def test_pruning_shows_as_sparsity_per_layer(tiny_model, tiny_eval, home):
    layers = view(tiny_model, tiny_eval, [{"technique": "magnitude_prune", "sparsity": 0.5}])
    assert all(lay["sparsity_after"] == pytest.approx(0.5, abs=0.02) and lay["bits"] == 32.0 for lay in layers)
    assert all(lay["codes"] is None and lay["after"][len(lay["after"]) // 2] > lay["before"][len(lay["before"]) // 2]
               for lay in layers)  # the spike at zero


def test_the_baseline_has_no_variant_to_view_one_clear_error(tiny_model, home):
    v = run_inline(JobSpec(model=tiny_model, kind="weights", compare={"variant_dir": None}))
    assert v.outcome == "failed" and "no saved variant" in v.error[1]
