"""Side-by-side generation (core/compare.py through a compare job): both models continue the
prompt greedily; the variant's tokens carry KL to the reference; top-5 per token."""
from __future__ import annotations

import pytest

from conftest import make_tiny_llama
from core.jobs.client import run_inline
from core.jobs.spec import JobSpec


def variant_of(tiny_model, tiny_eval, steps) -> str:
    rec = run_inline(JobSpec(model=tiny_model, recipe={"steps": steps}, eval=tiny_eval))
    assert rec.outcome == "done", rec.error
    return rec.result["variant_dir"]


def compare(tiny_model, ref_dir, var_dir, prompt="The tower is", n=12):
    spec = JobSpec(model=tiny_model, kind="compare",
                   compare={"prompt": prompt, "new_tokens": n, "reference": {"label": "base", "variant_dir": ref_dir},
                            "variant": {"label": "v", "variant_dir": var_dir}})
    return run_inline(spec)


def test_a_model_against_itself_agrees_everywhere(tiny_model, home):
    rec = compare(tiny_model, None, None)
    assert rec.outcome == "done", rec.error
    r = rec.result
    assert r["reference"]["ids"] == r["variant"]["ids"] and len(r["variant"]["ids"]) == 12
    assert r["first_diff"] is None and max(r["variant"]["kl"]) < 1e-6
    assert len(r["top"]) == 12 and all(len(t["reference"]) == 5 == len(t["variant"]) for t in r["top"])
    assert r["top"][0]["reference"][0]["id"] == r["reference"]["ids"][0]  # greedy = the top-1


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, tiny_tokenizer_dir) -> str:
    """Wider than the tiny model: its greedy output depends on the decoder, not only the embedding."""
    return str(make_tiny_llama(tmp_path_factory.mktemp("wide"), tiny_tokenizer_dir, hidden_size=256,
                               intermediate_size=704, num_hidden_layers=4))


def test_a_2_bit_variant_diverges_and_its_tokens_carry_kl(wide_model, tiny_eval, home):
    v = variant_of(wide_model, tiny_eval, [{"technique": "rtn", "bits": 2, "group_size": 0}])
    rec = compare(wide_model, None, v)
    assert rec.outcome == "done", rec.error
    r = rec.result
    assert r["mean_kl"] > 0.01 and all(k >= 0 for k in r["variant"]["kl"])
    assert r["first_diff"] is not None and r["reference"]["ids"][:r["first_diff"]] == r["variant"]["ids"][:r["first_diff"]]
    assert r["labels"] == {"reference": "base", "variant": "v"}


def test_an_empty_prompt_is_one_clear_error(tiny_model, home):
    rec = compare(tiny_model, None, None, prompt="  ")
    assert rec.outcome == "failed" and "type a prompt" in rec.error[1]
