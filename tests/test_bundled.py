"""Integration on the bundled SmolLM2-135M with a short slice of WikiText-2 test: the numbers a
user reads in the app are the honest ones."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import models
from core.jobs.client import run_inline
from core.jobs.spec import JobSpec
from core.variant import load_variant

from conftest import ROOT, WIKI_TEST

BUNDLED = "bundled:smollm2-135m"
pytestmark = pytest.mark.bundled
EVAL = dict(text=str(WIKI_TEST), max_tokens=1024, context=512, prompt_tokens=16, new_tokens=4, repeats=1)


def plain_transformers_ppl(model, tok, text_file: Path, max_tokens: int, context: int) -> float:
    """The protocol written out with nothing but transformers: BOS + window, every token scored."""
    text = text_file.read_text(encoding="utf-8").replace("\r\n", "\n")
    ids = tok(text, add_special_tokens=False).input_ids[:max_tokens]
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - context + 1, context):
            x = torch.tensor([[tok.bos_token_id] + ids[i:i + context]])
            out = model(x, labels=x)  # mean loss over the `context` predicted tokens
            nll += out.loss.item() * context
            n += context
    return math.exp(nll / n)


@pytest.fixture(scope="module")
def baseline():
    r = run_inline(JobSpec(model=BUNDLED, eval=EVAL))
    assert r.outcome == "done", r.error
    return r.result


def test_cli_eval_matches_a_plain_transformers_loop(baseline):
    p = subprocess.run([sys.executable, "-m", "core.cli", "eval", BUNDLED, "--text", WIKI_TEST, "--max-tokens", "1024",
                        "--context", "512", "--new-tokens", "4", "--repeats", "1", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = models.resolve(BUNDLED)
    ref = plain_transformers_ppl(AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d),
                                 WIKI_TEST, 1024, 512)
    assert r["ppl"] == pytest.approx(ref, rel=0.005)
    assert r["tokens_scored"] == 1024 and r["size_bytes"] == baseline["size_bytes"] > 500e6


def test_rtn_int4_g64_sym_is_under_0_35x_and_its_ppl_is_the_packed_files(baseline):
    r = run_inline(JobSpec(model=BUNDLED, eval=EVAL,
                           recipe={"steps": [{"technique": "rtn", "bits": 4, "group_size": 64, "symmetric": True}]}))
    assert r.outcome == "done", r.error
    q = r.result
    assert q["size_bytes"] <= 0.35 * baseline["size_bytes"]
    assert q["theoretical_bytes"] <= q["size_bytes"]
    model, tok = load_variant(q["variant_dir"])  # dequantized from the packed file alone
    assert q["ppl"] == pytest.approx(plain_transformers_ppl(model, tok, WIKI_TEST, 1024, 512), rel=1e-4)
    assert baseline["ppl"] < q["ppl"] < 2 * baseline["ppl"]


def test_magnitude_half_shows_the_halving_and_what_dense_storage_costs(baseline):
    r = run_inline(JobSpec(model=BUNDLED, eval=EVAL, evaluate=False,
                           recipe={"steps": [{"technique": "magnitude_prune", "sparsity": 0.5}]}))
    assert r.outcome == "done", r.error
    p = r.result
    cfg = json.loads((models.resolve(BUNDLED) / "config.json").read_text())
    h, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    linear = L * (2 * h * h + 2 * h * kv + 3 * h * f)
    assert baseline["nonzero_params"] - p["nonzero_params"] == pytest.approx(linear / 2, rel=0.01)
    assert p["size_bytes"] == pytest.approx(baseline["size_bytes"], rel=0.01)  # dense: no saving on disk
    assert p["theoretical_bytes"] == pytest.approx(baseline["theoretical_bytes"] - 2 * linear, rel=0.01)
