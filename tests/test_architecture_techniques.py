"""structured_prune and low_rank (issue 5) on tiny random Llamas: the units are really gone, the
ranks are as set, the saved folders load in plain transformers with the new shapes and compute
what the app's own loader computes."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from core import recipe as rc
from core.errors import RecipeError
from core.jobs.client import run_inline
from core.jobs.spec import JobSpec
from core.techniques import registry
from core.techniques.architecture import LOWRANK_FILE, LOWRANK_KEY, factors, rank_for
from core.techniques.base import StepContext
from core.variant import count_params, load_variant

CALIB = {"samples": 8, "seq_len": 128}  # seconds on the tiny model


def run(model, eval_settings, *steps, evaluate=True):
    r = run_inline(JobSpec(model=model, recipe=rc.of(*steps).to_dict(), eval=eval_settings, evaluate=evaluate))
    assert r.outcome == "done", r.error
    return r.result


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory, tiny_tokenizer_dir) -> str:
    """Four layers, 4 query heads in 2 KV groups of head_dim 24, FFN 160."""
    return str(make_tiny_llama(tmp_path_factory.mktemp("deep-llama"), tiny_tokenizer_dir, num_hidden_layers=4))


def ids_of(tok, n=40):
    return torch.tensor([tok("The tower is 324 metres tall, about the same height as an 81-storey building.")
                         ["input_ids"][:n]])


def plain_logits(d, ids, **kw):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return m, m(ids).logits


def expected_params(vocab, hidden, layers, heads, kv, d, inter):
    attn = hidden * heads * d * 2 + hidden * kv * d * 2
    return vocab * hidden + layers * (attn + 3 * hidden * inter + 2 * hidden) + hidden


@pytest.mark.parametrize("compensate", [False, True])
def test_structured_prune_removes_layers_heads_and_channels_and_plain_transformers_loads_it(deep_model, tiny_eval,
                                                                                            home, compensate):
    r = run(deep_model, tiny_eval, ("structured_prune", {"layers": 0.5, "heads": 0.5, "ffn": 0.3,
                                                         "compensate": compensate, **CALIB}))
    d = Path(r["variant_dir"])
    cfg = json.loads((d / "config.json").read_text())
    # 4 -> 2 layers; 1 of the 2 query heads in each of the 2 KV groups; 48 of 160 channels (30 %)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["head_dim"]) == (2, 2, 2, 112, 24)
    want = expected_params(384, 96, 2, 2, 2, 24, 112)
    assert r["params"] == want
    assert r["params"] < 0.45 * expected_params(384, 96, 4, 4, 2, 24, 160) + 384 * 96
    info = r["steps"][0]
    assert info["layers"] == 2 and len(info["layers_removed"]) == 2
    # the layers removed are the two of least block influence
    bi = info["block_influence"]
    assert sorted(info["layers_removed"]) == sorted(sorted(range(4), key=lambda i: bi[i])[:2])

    # plain transformers, no remote code: a genuinely smaller Llama with the same numbers as the app's loader
    ours, tok = load_variant(d)
    ids = ids_of(tok)
    plain, logits = plain_logits(d, ids)
    assert type(plain).__name__ == "LlamaForCausalLM" and len(plain.model.layers) == 2
    attn = plain.model.layers[1].self_attn
    assert attn.q_proj.weight.shape == (48, 96) and attn.k_proj.weight.shape == (48, 96)
    assert attn.o_proj.weight.shape == (96, 48)
    assert plain.model.layers[0].mlp.down_proj.weight.shape == (96, 112)
    assert count_params(plain)[0] == want
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, logits, atol=1e-5)
    from core import evaluate as ev
    p = ev.perplexity(plain, tok, Path(tiny_eval["text"]), tiny_eval["max_tokens"], tiny_eval["context"])
    assert p["ppl"] == pytest.approx(r["ppl"], rel=1e-5)


def test_whole_kv_groups_go_and_the_kv_projections_shrink(deep_model, tiny_eval, home):
    r = run(deep_model, tiny_eval, ("structured_prune", {"heads": 0.5, "head_unit": "group", "ffn": 0.0, **CALIB}),
            evaluate=False)
    d = Path(r["variant_dir"])
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"]) == (4, 2, 1, 160)
    ours, tok = load_variant(d)
    plain, logits = plain_logits(d, ids_of(tok))
    assert plain.model.layers[0].self_attn.k_proj.weight.shape == (24, 96)
    assert plain.model.layers[0].self_attn.num_key_value_groups == 2
    with torch.no_grad():
        assert torch.allclose(ours(ids_of(tok)).logits, logits, atol=1e-5)


def test_head_dim_stays_in_the_config_where_transformers_would_drop_it(tmp_path, tiny_tokenizer_dir, tiny_eval, home):
    # head_dim 128 is LlamaConfig's default, so save_pretrained leaves it out, and a loader would
    # recompute hidden_size / heads = 256 after pruning one of two heads.
    m = str(make_tiny_llama(tmp_path / "hd128", tiny_tokenizer_dir, hidden_size=256, intermediate_size=128,
                            num_attention_heads=2, num_key_value_heads=2))
    r = run(m, tiny_eval, ("structured_prune", {"heads": 0.5, "head_unit": "group", "ffn": 0.0, **CALIB}),
            evaluate=False)
    cfg = json.loads((Path(r["variant_dir"]) / "config.json").read_text())
    assert cfg["head_dim"] == 128 and cfg["num_attention_heads"] == 1
    plain, _ = plain_logits(r["variant_dir"], torch.tensor([[1, 5, 9]]))
    assert plain.model.layers[0].self_attn.q_proj.weight.shape == (128, 256)


def _prepared(tmp_path, tokenizer_dir):
    """A 4-layer model with planted answers: layer 2 computes nothing (o_proj and down_proj zero: its
    output is its input), query heads 1 and 3 (one per KV group) of every layer have a zero output
    projection, and FFN channels
    0..47 of every layer have zero down-projection columns."""
    from transformers import AutoModelForCausalLM
    src = make_tiny_llama(tmp_path / "src", tokenizer_dir, num_hidden_layers=4)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight[:, 24:48] = 0   # query head 1 (KV group 0)
            layer.self_attn.o_proj.weight[:, 72:96] = 0   # query head 3 (KV group 1)
            layer.mlp.down_proj.weight[:, :48] = 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    out = tmp_path / "planted"
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return str(out)


def test_importance_finds_the_planted_dead_layer_head_and_channels(tmp_path, tiny_tokenizer_dir, home):
    from core import models
    m = _prepared(tmp_path, tiny_tokenizer_dir)
    model, tok, _ = models.load(m)
    ids = ids_of(tok)
    with torch.no_grad():
        before = model(ids).logits
    tech = registry.get("structured_prune")
    info = tech.apply(model, tech.make({"layers": 0.25, "heads": 0.5, "ffn": 0.3, **CALIB}),
                      StepContext(tokenizer=tok))
    assert info["layers_removed"] == [2] and info["block_influence"][2] == pytest.approx(0.0, abs=1e-6)
    assert min(b for i, b in enumerate(info["block_influence"]) if i != 2) > 0.01
    # every unit removed computed nothing: the pruned model computes exactly what the full one did
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4)
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1, 2]
    assert model.model.layers[0].mlp.down_proj.weight.shape == (96, 112)
    # the KV cache works on the renumbered layers: decoding token by token = one full forward
    from transformers import DynamicCache
    with torch.no_grad():
        cache = DynamicCache()
        out = model(ids[:, :-3], past_key_values=cache, use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(ids.shape[1] - 3, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
    assert torch.allclose(torch.stack(steps[:-1], 1), after[:, -4:-1], atol=1e-4)


def test_linear_heal_brings_a_layer_prune_closer_to_the_full_model_on_unseen_text(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    from core import models
    src = make_tiny_llama(tmp_path / "src", tiny_tokenizer_dir, num_hidden_layers=4)
    full = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():  # layer 2 writes little into the residual stream: the one block influence drops
        full.model.layers[2].self_attn.o_proj.weight.mul_(0.3)
        full.model.layers[2].mlp.down_proj.weight.mul_(0.3)
    full.save_pretrained(tmp_path / "m")
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / "m" / f.name)
    full, tok, _ = models.load(str(tmp_path / "m"))
    ids = ids_of(tok)  # not calibration text
    with torch.no_grad():
        want = torch.log_softmax(full(ids).logits, -1)

    def kl_after(heal: bool):
        model, _, _ = models.load(str(tmp_path / "m"))
        tech = registry.get("structured_prune")
        info = tech.apply(model, tech.make({"layers": 0.25, "ffn": 0.0, "linear_heal": heal, **CALIB}),
                          StepContext(tokenizer=tok))
        with torch.no_grad():
            got = torch.log_softmax(model(ids).logits, -1)
        return float((want.exp() * (want - got)).sum(-1).mean()), info

    plain, info_plain = kl_after(False)
    healed, info = kl_after(True)
    assert info["layers_removed"] == info_plain["layers_removed"] == [2] and "healed_runs" not in info_plain
    assert info["healed_runs"] == [[2, 2]]  # folded into layer 1's down_proj: same shapes, closer outputs
    assert healed < 0.8 * plain, (healed, plain)


def test_low_rank_ranks_as_set_file_smaller_by_the_factors_and_loads_with_remote_code(tiny_model, tiny_eval, home):
    base = run(tiny_model, tiny_eval, evaluate=False)
    r = run(tiny_model, tiny_eval, ("low_rank", {"keep": 0.5, "allocation": "uniform", **CALIB}))
    d = Path(r["variant_dir"])
    # rank = floor(keep * out * in / (out + in)): q/o 96x96 -> 24, k/v 48x96 -> 16, gate/up/down 160x96 -> 30
    assert (rank_for(96, 96, 0.5), rank_for(48, 96, 0.5), rank_for(160, 96, 0.5)) == (24, 16, 30)
    cfg = json.loads((d / "config.json").read_text())
    ranks = cfg[LOWRANK_KEY]
    assert len(ranks) == 14
    assert ranks["model.layers.1.self_attn.q_proj"] == 24 and ranks["model.layers.0.self_attn.v_proj"] == 16
    assert ranks["model.layers.1.mlp.down_proj"] == 30
    per_layer_before = 2 * 96 * 96 + 2 * 48 * 96 + 3 * 160 * 96                    # 73,728
    per_layer_after = 2 * 24 * 192 + 2 * 16 * 144 + 3 * 30 * 256                   # 36,864
    saved = 2 * (per_layer_before - per_layer_after)
    assert r["params"] == base["params"] - saved
    assert r["steps"][0]["linear_params_after"] == 2 * per_layer_after
    shrink = base["size_bytes"] - r["size_bytes"]
    assert abs(shrink - 4 * saved) < 4096  # float32 factors; the rest is the safetensors header
    assert (d / LOWRANK_FILE).is_file() and "AutoModelForCausalLM" in cfg["auto_map"]

    ours, tok = load_variant(d)
    assert ours.model.layers[0].mlp.gate_proj[0].weight.shape == (30, 96)
    assert ours.model.layers[0].mlp.gate_proj[1].weight.shape == (160, 30)
    ids = ids_of(tok)
    plain, logits = plain_logits(d, ids, trust_remote_code=True)
    assert plain.model.layers[1].self_attn.k_proj[1].weight.shape == (48, 16)
    assert count_params(plain)[0] == r["params"]
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, logits, atol=1e-5)
    from core import evaluate as ev
    p = ev.perplexity(plain, tok, Path(tiny_eval["text"]), tiny_eval["max_tokens"], tiny_eval["context"])
    assert p["ppl"] == pytest.approx(r["ppl"], rel=1e-5)


def test_low_rank_after_structured_prune_composes_and_loads(deep_model, tiny_eval, home):
    r = run(deep_model, tiny_eval, ("structured_prune", {"layers": 0.25, "ffn": 0.5, **CALIB}),
            ("low_rank", {"keep": 0.6, "allocation": "uniform", **CALIB}), evaluate=False)
    d = Path(r["variant_dir"])
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["intermediate_size"] == 80
    assert cfg[LOWRANK_KEY]["model.layers.2.mlp.up_proj"] == rank_for(80, 96, 0.6) == 26
    ours, tok = load_variant(d)
    plain, logits = plain_logits(d, ids_of(tok), trust_remote_code=True)
    with torch.no_grad():
        assert torch.allclose(ours(ids_of(tok)).logits, logits, atol=1e-5)


def test_activation_aware_factors_beat_plain_svd_on_the_inputs_they_were_fitted_on():
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    mix = torch.randn(48, 48) * torch.logspace(0, -2, 48)  # strongly correlated, uneven inputs
    x = torch.randn(2000, 48) @ mix.T
    h = x.T @ x
    for r in (4, 12, 24):
        a, b = factors(w, r, h, damping=0.0)
        pa, pb = factors(w, r)
        aware = ((x @ (w - b @ a).T) ** 2).sum()
        plain = ((x @ (w - pb @ pa).T) ** 2).sum()
        assert aware < 0.8 * plain, (r, aware, plain)
        # and plain SVD is the better fit of the weights themselves (Eckart-Young)
        assert ((w - pb @ pa) ** 2).sum() <= ((w - b @ a) ** 2).sum()
    a, b = factors(w, 48, h, damping=0.0)  # full rank: the weight comes back
    assert torch.allclose(b @ a, w, atol=1e-3)


def test_loss_allocation_spends_the_budget_on_the_directions_worth_most_per_parameter():
    from core.techniques.architecture import allocate
    shapes = {"big": (100, 100), "small": (10, 30)}     # a direction costs 200 / 40 parameters
    costs = {"big": torch.tensor([50.0, 40.0, 1.0, 0.5] + [0.0] * 96),
             "small": torch.tensor([9.0, 4.0, 2.0, 0.1] + [0.0] * 6)}
    plan = allocate(costs, shapes, keep=520 / 10300)    # 520 parameters to spend
    # per parameter: big 0.25, 0.2, 0.005 / small 0.225, 0.1, 0.05: big's two best (400), small's three (120)
    assert plan == {"big": [0, 1], "small": [0, 1, 2]}
    # a Linear whose kept directions would outweigh its dense weight stays dense: past its break-even
    # rank (7.5) more directions cost nothing, and the rest of the budget goes to the other Linear
    costs = {"big": torch.ones(100), "small": torch.arange(10, 0, -1).float()}
    plan = allocate(costs, shapes, keep=700 / 10300)
    assert plan["small"] is None and len(plan["big"]) == 2


@pytest.mark.parametrize("sequential", [False, True])
def test_loss_allocation_keeps_the_budget_and_the_variant_loads(tiny_model, tiny_eval, home, sequential):
    base = run(tiny_model, tiny_eval, evaluate=False)
    r = run(tiny_model, tiny_eval, ("low_rank", {"keep": 0.5, "allocation": "loss", "sequential": sequential,
                                                 **CALIB}), evaluate=False)
    info = r["steps"][0]
    assert info["allocation"] == "loss" and 0.45 <= info["kept"] <= 0.5
    assert base["params"] - r["params"] == info["linear_params_before"] - info["linear_params_after"]
    d = Path(r["variant_dir"])
    ranks = json.loads((d / "config.json").read_text())[LOWRANK_KEY]
    assert len(set(ranks.values())) > 3  # not one rank per shape: the ranks follow the loss
    ours, tok = load_variant(d)
    plain, logits = plain_logits(d, ids_of(tok), trust_remote_code=True)
    with torch.no_grad():
        assert torch.allclose(ours(ids_of(tok)).logits, logits, atol=1e-5)


def test_rank_rule_skips_linears_whose_factors_would_not_be_smaller():
    assert rank_for(576, 576, 0.8) == 230 and rank_for(1536, 576, 0.8) == 335 and rank_for(192, 576, 0.8) == 115
    assert rank_for(4, 4, 0.2) == 0        # floor(0.4) = 0: nothing to keep
    for out_f, in_f in ((576, 576), (1536, 576), (192, 576), (7, 3)):
        r = rank_for(out_f, in_f, 0.95)
        assert r == 0 or r * (out_f + in_f) < out_f * in_f


@pytest.mark.parametrize("steps, words", [
    ([("rtn", {}), ("structured_prune", {})], "put structured_prune before rtn"),
    ([("gptq", {}), ("low_rank", {})], "put low_rank before gptq"),
    ([("low_rank", {}), ("structured_prune", {})], "Put structured_prune before low_rank"),
    ([("low_rank", {}), ("low_rank", {})], "keep one low_rank step"),
])
def test_shape_changes_come_before_quantization(steps, words):
    with pytest.raises(RecipeError) as e:
        rc.of(*steps)
    assert words in str(e.value) and e.value.step == 1
    assert rc.of(("structured_prune", {}), ("low_rank", {}), ("gptq", {})).steps[2].name == "gptq"


def test_quantization_after_low_rank_packs_the_factors_and_loads_back(tiny_model, tiny_eval, home):
    lr = run(tiny_model, tiny_eval, ("low_rank", {"keep": 0.5, "allocation": "uniform", **CALIB}))
    q = run(tiny_model, tiny_eval, ("low_rank", {"keep": 0.5, "allocation": "uniform", **CALIB}), ("rtn", {"bits": 8, "group_size": 32}))
    man = json.loads((Path(q["variant_dir"]) / "squeeze.json").read_text())
    assert len(man["packed"]) == 28  # both factors of the 14 factored Linears
    assert "model.layers.0.mlp.down_proj.1.weight" in man["packed"]
    factor_bytes = 4 * 2 * 36_864  # float32 factors of the two layers
    assert lr["size_bytes"] - q["size_bytes"] > 0.7 * factor_bytes  # 1 byte per weight + fp16 scale per 32
    assert q["ppl"] == pytest.approx(lr["ppl"], rel=0.02)  # 8-bit codes of the factors: nearly the same model


def test_compensated_removal_keeps_a_layers_output_better_than_dropping_units_alone():
    from core.techniques.architecture import obs_remove
    torch.manual_seed(0)
    mix = torch.randn(48, 48)
    X = torch.randn(2000, 48) @ mix * torch.rand(48)          # correlated inputs (tokens, in)
    W = torch.randn(16, 48)
    H = X.T @ X / len(X)
    err = lambda Wn: float(((X @ (W - Wn).T) ** 2).sum(1).mean())  # noqa: E731
    gone, Wc = obs_remove(W, H, None, 16)
    assert len(set(gone)) == 16 and bool((Wc[:, gone] == 0).all())
    keep = [j for j in range(48) if j not in gone]
    # the refit is the least-squares fit of the full output from the kept inputs
    fit = torch.linalg.lstsq(X[:, keep], X @ W.T).solution.T
    assert err(Wc) == pytest.approx(err(torch.zeros_like(W).index_copy(1, torch.tensor(keep), fit)), rel=0.05)
    # dropping the 16 lowest-importance columns and keeping the rest as they were costs far more
    imp = X.norm(dim=0) * W.norm(dim=0)
    plain = W.clone()
    plain[:, imp.argsort()[:16]] = 0.0
    assert err(Wc) < 0.5 * err(plain)
    # blocks (heads) with at most one removed per group of two
    blocks = [torch.arange(b * 6, b * 6 + 6) for b in range(8)]
    gone_b, Wb = obs_remove(W, H, blocks, 3, (lambda u: u // 2, 1))
    assert len({u // 2 for u in gone_b}) == 3 and bool((Wb[:, torch.cat([blocks[u] for u in gone_b])] == 0).all())
