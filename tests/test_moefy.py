"""moefy on the tiny Llama (hidden 96, FFN 160): top_k = experts is the dense model, top_k < experts
computes only the chosen experts, the FLOPs ratio is k/E + router, and the saved variant keeps its routers."""
import json
import subprocess
import sys

import pytest
import torch

from core import models
from core.techniques import moefy as mf
from core.techniques import registry
from core.techniques.base import StepContext
from core.variant import load_variant, save_variant
from conftest import ROOT

FAST = {"samples": 8, "seq_len": 128}


def fitted(model_id, **values):
    model, tok, _ = models.load(model_id)
    ctx = StepContext(tokenizer=tok, state_key="moefy-test")
    tech = registry.get("moefy")
    info = tech.apply(model, tech.make({**FAST, **values}), ctx)
    return model, tok, ctx, info


def ids(n=40, seed=1):
    return torch.randint(3, 384, (1, n), generator=torch.Generator().manual_seed(seed))


def test_balanced_kmeans_sizes_and_bounds():
    assert mf.expert_bounds(160, 8) == [0, 20, 40, 60, 80, 100, 120, 140, 160]
    assert mf.expert_bounds(10, 3) == [0, 4, 7, 10]
    f = torch.randn(37, 5, generator=torch.Generator().manual_seed(0))
    a = mf.balanced_kmeans(f, 4)
    assert sorted(torch.bincount(a, minlength=4).tolist()) == [9, 9, 9, 10]
    # well-separated clusters are found
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(4) * 20
    pts = torch.cat([c + torch.randn(10, 4, generator=g) for c in centres])
    a = mf.balanced_kmeans(pts, 4)
    for c in range(4):
        assert a[c * 10:(c + 1) * 10].unique().numel() == 1


def test_all_experts_is_the_dense_model(tiny_model, home):
    dense = models.load(tiny_model)[0]
    model, _, _, info = fitted(tiny_model, experts=8, top_k=8)
    x = ids()
    with torch.no_grad():
        want = dense(x).logits
        got = model(x).logits
        # decoding token by token through the routed FFN (the n == 1 path) as well
        out = model(x[:, :20], use_cache=True)
        step = model(x[:, 20:21], past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(step[0, 0], want[0, 20], atol=1e-4)
    assert mf.experts_per_token(model) == 8.0
    assert info["ffn_flops_ratio"] == pytest.approx(1 + 8 / (3 * 160), abs=1e-4)


def test_only_the_chosen_experts_are_computed(tiny_model, home):
    model, _, _, info = fitted(tiny_model, experts=8, top_k=2)
    assert info["ffn_flops_ratio"] == pytest.approx(2 / 8 + 8 / (3 * 160), abs=1e-4)
    assert mf.flops_ratio(576, 1536, 8, 2) == pytest.approx(0.25 + 8 / (3 * 1536))
    x = ids()
    mlp = model.model.layers[0].mlp
    st = mlp._moefy
    with torch.no_grad():
        base = model(x).logits
        assert mf.experts_per_token(model) == 2.0  # per token per layer
        # the experts chosen in layer 0 for the last token
        seen = {}
        h = mlp.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
        model(x)
        h.remove()
        xin = seen["x"][0]                                              # (T, h)
        top = (xin @ st.w.T + st.b).topk(2, 1).indices                  # (T, 2)
        b = st.bounds
        # a one-token decode step computes exactly its two experts
        out = model(x[:, :-1], use_cache=True)
        mf.experts_per_token(model)
        st.expert_tokens = [0] * 8
        model(x[:, -1:], past_key_values=out.past_key_values, use_cache=True)
        assert sorted(e for e in range(8) if st.expert_tokens[e]) == sorted(top[-1].tolist())
        # zeroing the experts no token chose (3 tokens choose at most 6 of 8) leaves the output
        # unchanged; zeroing a chosen one does not
        short = x[:, :3]
        base = model(short).logits
        unused = [e for e in range(8) if not (top[:3] == e).any()]
        assert len(unused) >= 2
        for e in unused:
            for m in (mlp.gate_proj, mlp.up_proj):
                m.weight[b[e]:b[e + 1]] = 0
            mlp.down_proj.weight[:, b[e]:b[e + 1]] = 0
        assert torch.equal(model(short).logits, base)
        c = int(top[0, 0])
        mlp.down_proj.weight[:, b[c]:b[c + 1]] = 0
        assert not torch.allclose(model(short).logits, base, atol=1e-5)


def test_runtime_entry_survives_save_and_load(tiny_model, home, tmp_path):
    model, tok, ctx, _ = fitted(tiny_model, experts=4, top_k=1)
    assert len(ctx.runtime) == 1 and ctx.runtime[0].startswith("moefy:")
    entry = json.loads(ctx.runtime[0].split(":", 1)[1])
    assert entry["experts"] == 4 and entry["top_k"] == 1 and len(entry["layers"]) == 2
    save_variant(model, tok, ctx.packed, ctx.runtime, tmp_path / "v", {"steps": []})
    back, _ = load_variant(tmp_path / "v")
    x = ids(60, seed=4)
    dense = models.load(tiny_model)[0]
    with torch.no_grad():
        a, b = model(x).logits, back(x).logits
        d = dense(x).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, d, atol=1e-4)  # top-1 of 4 really changed the model
    assert mf.experts_per_token(back) == 1.0


def test_top_k_above_experts_is_refused(tiny_model, home):
    from core.errors import RecipeError
    with pytest.raises(RecipeError, match="top_k"):
        fitted(tiny_model, experts=4, top_k=6)


def test_listed_by_the_cli():
    out = subprocess.run([sys.executable, "-m", "core.cli", "techniques", "--json"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    t = next(t for t in json.loads(out) if t["name"] == "moefy")
    assert t["family"] == "architecture"
    assert {f["name"] for f in t["fields"]} >= {"experts", "top_k", "samples", "seq_len", "calib_text"}


def test_routed_ffn_is_chosen_experts_plus_skipped_means(tiny_model, home):
    model, _, _, _ = fitted(tiny_model, experts=4, top_k=1)
    mlp = model.model.layers[1].mlp
    st = mlp._moefy
    assert st.mean is not None and st.mean.shape == (4, 96)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(3))
    b = st.bounds
    with torch.no_grad():
        want = []
        for row in x:
            e = int((st.w @ row + st.b).argmax())
            s, t = b[e], b[e + 1]
            act = torch.nn.functional.silu(mlp.gate_proj.weight[s:t] @ row) * (mlp.up_proj.weight[s:t] @ row)
            want.append(mlp.down_proj.weight[:, s:t] @ act + st.mean.sum(0) - st.mean[e])
        want = torch.stack(want)
        assert torch.allclose(mlp(x[None])[0], want, atol=1e-5)            # many tokens: gathered per expert
        assert torch.allclose(mlp(x[2:3][None])[0, 0], want[2], atol=1e-5)  # one token: its expert's slices
    plain, _, _, _ = fitted(tiny_model, experts=4, top_k=1, compensate=False)
    assert plain.model.layers[1].mlp._moefy.mean is None


def test_unsliceable_projections_fall_back_to_masked_neurons(tiny_model, home):
    model, _, _, _ = fitted(tiny_model, experts=4, top_k=2)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 7, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = mlp(x)
        got = mf._masked(mlp, mlp._moefy, x)
    assert torch.allclose(got, want, atol=1e-5)


def test_moefy_then_dynamic_int8_runs_the_same_experts(tiny_model, home):
    from core.techniques.quantization import to_dynamic_int8
    model, _, ctx, _ = fitted(tiny_model, experts=4, top_k=2)
    tech = registry.get("dynamic_int8")
    tech.apply(model, tech.make({}), ctx)
    x = ids(20, seed=6)
    with torch.no_grad():
        sim = model(x).logits          # float (dequantized) weights: sliced experts
        to_dynamic_int8(model, ctx.packed)
        assert not isinstance(getattr(model.model.layers[0].mlp.gate_proj, "weight", None), torch.Tensor)
        q = model(x).logits            # int8 kernels: masked neurons
    assert torch.isfinite(q).all()
    assert (q - sim).abs().max() < 0.05 * sim.abs().max()
    assert mf.experts_per_token(model) == 2.0


def test_a_job_reports_the_flops_ratio_and_measures_the_saved_variant(tiny_model, tiny_eval, home):
    from pathlib import Path

    from core import recipe as rc
    from core.jobs.client import run_inline
    from core.jobs.spec import JobSpec
    r = run_inline(JobSpec(model=tiny_model, recipe=rc.of(("moefy", {**FAST, "experts": 4, "top_k": 1})).to_dict(),
                           eval=tiny_eval, evaluate=True))
    assert r.outcome == "done", r.error
    step = r.result["steps"][0]
    assert step["technique"] == "moefy"
    assert step["ffn_flops_ratio"] == pytest.approx(1 / 4 + 4 / (3 * 160), abs=1e-4)
    assert r.result["ppl"] > 1 and r.result["decode_tokens_per_s"] > 0
    man = json.loads((Path(r.result["variant_dir"]) / "squeeze.json").read_text())
    assert any(e.startswith("moefy:") for e in man["runtime"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_moefied_model_heals_under_distill_in_either_precision(tiny_model, home, precision):
    """moefy → distill trains the experts behind the fixed router; under bf16 autocast (what distill picks on a
    CPU with bf16) the experts' outputs come back in bf16 and used to break the routed FFN's sum."""
    model, _, ctx, _ = fitted(tiny_model, experts=4, top_k=1)
    ctx.base_model = lambda: models.load(tiny_model)[0]
    d = registry.get("distill")
    out = d.apply(model, d.make({"samples": 16, "seq_len": 128, "batch_size": 4, "lr": 3e-3, "steps": 10,
                                 "precision": precision}), ctx)
    assert out["steps"] == 10 and sum(out["losses"][-3:]) < sum(out["losses"][:3])
    assert mf.experts_per_token(model) == 1.0  # still routed: one expert a token
