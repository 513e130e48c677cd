"""early_exit on a 6-layer tiny Llama: exits are taken exactly where the heads clear the
threshold, skipped layers still get their KV entries, and the saved variant keeps its exits."""
import json
from pathlib import Path

import pytest
import torch

from core import models
from core import recipe as rc
from core.jobs.client import run_inline
from core.jobs.spec import JobSpec
from core.techniques import early_exit as ee
from core.techniques import registry
from core.techniques.base import StepContext
from core.variant import load_variant
from conftest import make_tiny_llama

FAST = {"samples": 8, "seq_len": 128, "first_exit": 0.3, "every": 1}


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory, tiny_tokenizer_dir) -> str:
    return str(make_tiny_llama(tmp_path_factory.mktemp("deep-llama"), tiny_tokenizer_dir, seed=3,
                               num_hidden_layers=6))


def fitted(model_id, **values):
    model, tok, _ = models.load(model_id)
    ctx = StepContext(tokenizer=tok, state_key="ee-test")
    info = registry.get("early_exit").apply(model, registry.get("early_exit").make({**FAST, **values}), ctx)
    return model, tok, ctx, info


def test_exit_points_follow_the_sliders():
    assert ee.exit_points(30, 0.5, 2) == [15, 17, 19, 21, 23, 25, 27, 29]
    assert ee.exit_points(6, 0.3, 1) == [2, 3, 4, 5]


def test_each_position_leaves_at_its_first_confident_exit(deep_model, home):
    g = torch.Generator().manual_seed(2)  # heads with spread-out confidences (a random model's fitted
    # heads are all sure: its layers barely move the distribution)
    entry = {"points": [2, 3, 4, 5], "heads": {str(p): [(torch.randn(96, generator=g) * 0.3).tolist(), 0.0]
                                               for p in (2, 3, 4, 5)}}
    ids = torch.randint(3, 384, (1, 40), generator=torch.Generator().manual_seed(1))
    plain = models.load(deep_model)[0]
    with torch.no_grad():
        hs = plain(ids, output_hidden_states=True).hidden_states
        conf = {p: torch.sigmoid(plain.model.norm(hs[p][0]) @ torch.tensor(entry["heads"][str(p)][0])
                                 + entry["heads"][str(p)][1]) for p in entry["points"]}
        m = torch.stack(list(conf.values())).amax(0).sort().values
        t = float(m[19] + m[20]) / 2  # about half the positions exit
        expect = torch.full((40,), 6.0)
        done = torch.zeros(40, dtype=torch.bool)
        for p in entry["points"]:
            go = (conf[p] >= t) & ~done
            expect[go] = p
            done |= go
        model = models.load(deep_model)[0]
        ee.attach(model, {**entry, "threshold": t})
        logits = model(ids).logits[0]
    assert model.model._early_exit.layers_run["window"] == expect.tolist()
    assert 0 < done.sum() < 40  # some positions exit, some run every layer: the test means something
    # an exited position's logits are the LM head on its exit layer's state; the others the full model's
    j, k = int(torch.nonzero(done)[0]), int(torch.nonzero(~done)[0])
    want = plain.lm_head(plain.model.norm(hs[int(expect[j])][0, j]))
    assert torch.allclose(logits[j], want, atol=1e-4)
    assert torch.allclose(logits[k], plain(ids).logits[0, k], atol=1e-4)


def test_an_unreachable_threshold_changes_nothing(deep_model, home):
    model, _, ctx, _ = fitted(deep_model)
    entry = json.loads(ctx.runtime[0].split(":", 1)[1])
    plain = models.load(deep_model)[0]
    ee.attach(plain, {**entry, "threshold": 2.0})  # a sigmoid never reaches 2
    ref = models.load(deep_model)[0]
    ids = torch.randint(3, 384, (1, 30))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ref(ids).logits)
    assert ee.layers_per_token(plain) == 6.0


def test_decoding_skips_layers_but_fills_every_layers_cache(deep_model, home):
    model, _, ctx, _ = fitted(deep_model, threshold=0.01)  # every token leaves at the first point
    ids = torch.randint(3, 384, (1, 12))
    from transformers import DynamicCache
    cache = DynamicCache()
    ee.layers_per_token(model)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(5):
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
    assert all(cache.get_seq_length(i) == 17 for i in range(6))  # skipped layers got their KV too
    assert model.model._early_exit.layers_run["decode"] == [2.0] * 5  # each decoded token ran 2 of 6 layers


def test_recommended_threshold_keeps_the_mean_kl_within_budget(deep_model, home):
    _, _, ctx, info = fitted(deep_model, budget=0.05)
    table = {r["threshold"]: r for r in info["threshold_table"]}
    rec = info["recommended_threshold"]
    assert info["threshold"] == rec  # 0 = auto
    if table[rec]["mean_kl"] > 0.05:  # only when no threshold on the grid meets it: the strictest
        assert rec == max(table)
    else:
        assert all(r["mean_kl"] > 0.05 for t, r in table.items() if t < rec)
    assert info["calib_layers_per_token"] == pytest.approx(table[rec]["layers_per_token"])
    assert table[max(table)]["layers_per_token"] >= table[min(table)]["layers_per_token"]  # stricter: deeper


def test_saved_variant_keeps_its_exits(deep_model, tiny_eval, home):
    r = run_inline(JobSpec(model=deep_model, recipe=rc.of(("early_exit", {**FAST, "threshold": 0.5})).to_dict(),
                           eval=tiny_eval, evaluate=True))
    assert r.outcome == "done", r.error
    assert 2.0 <= r.result["eval_layers_per_token"] <= 6.0  # reported beside perplexity
    assert 2.0 <= r.result["decode_layers_per_token"] <= 6.0
    man = json.loads((Path(r.result["variant_dir"]) / "squeeze.json").read_text())
    assert any(e.startswith("early_exit:") for e in man["runtime"])
    model, _ = load_variant(r.result["variant_dir"])
    again, _, _, _ = fitted(deep_model, threshold=0.5)
    ids = torch.randint(3, 384, (1, 30))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)
    assert ee.layers_per_token(model) == ee.layers_per_token(again)  # the same exits, token by token


def test_adapters_bring_each_exit_closer_to_the_full_model(deep_model, home):
    *_, raw = fitted(deep_model, adapter=False)
    model, _, _, tuned = fitted(deep_model)
    assert set(model.model.exit_adapters) == {"2", "3", "4", "5"}
    for p, kl in raw["calib_mean_kl_per_exit"].items():
        assert tuned["calib_mean_kl_per_exit"][p] < 0.5 * kl, p


def test_an_exited_token_is_read_through_its_exits_adapter(deep_model, home):
    model, _, _, _ = fitted(deep_model, threshold=0.01)  # every position leaves at the first point (2 layers)
    plain = models.load(deep_model)[0]
    ids = torch.randint(3, 384, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        h2 = plain(ids, output_hidden_states=True).hidden_states[2]
        want = plain.lm_head(plain.model.norm(model.model.exit_adapters["2"](h2)))
        raw = plain.lm_head(plain.model.norm(h2))
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, raw, atol=1e-3)  # the adapter is not the identity


def test_early_exit_after_quantization_the_order_the_panel_runs_saves_and_loads(deep_model, tiny_eval, home):
    """The GUI runs early_exit after quantization (its heads fitted to the weights as they end up): the job
    evaluates, saves and loads back a packed model with exits."""
    r = run_inline(JobSpec(model=deep_model, recipe=rc.of(("rtn", {"bits": 8}),
                                                          ("early_exit", {**FAST, "threshold": 0.5})).to_dict(),
                           eval=tiny_eval, evaluate=True))
    assert r.outcome == "done", r.error
    assert 2.0 <= r.result["eval_layers_per_token"] <= 6.0
    model, _ = load_variant(r.result["variant_dir"])
    with torch.no_grad():
        model(torch.randint(3, 384, (1, 30)))
    assert ee.layers_per_token(model) is not None  # the exits came back with the packed weights
