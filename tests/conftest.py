"""Shared fixtures. Every test runs with SQUEEZE_HOME in a temporary folder: the user's real
ledger and caches are never touched. The bundled model is converted once per test session."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

import bundle_build

# One home per test process, however this module is imported (as `conftest` by pytest, or again as
# `tests.conftest`: a second folder would take SQUEEZE_HOME over and outlive the session)
_first = next((m for name in ("conftest", "tests.conftest") if (m := sys.modules.get(name)) is not None
               and hasattr(m, "_SESSION_HOME")), None)
_SESSION_HOME = _first._SESSION_HOME if _first else Path(tempfile.mkdtemp(prefix="squeeze-test-home-"))
os.environ["SQUEEZE_HOME"] = str(_SESSION_HOME)
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
WIKI_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
WIKI_VALID = SHARED_DATA / "wikitext-2" / "valid.tokens"


def pytest_collection_modifyitems(session, config, items):
    """The bundle's tests last, and the tests that measure timing after them: the bundle builds in
    the background meanwhile (tests/bundle_build.py), at the lowest priority."""
    def order(item) -> int:
        if item.get_closest_marker("quiet_machine"):
            return 2
        return 1 if item.path.name == "test_bundle.py" else 0
    items.sort(key=order)  # (a stable sort: each group keeps its order)
    if not config.option.collectonly and any(item.path.name == "test_bundle.py" for item in items):
        bundle_build.start()


def pytest_sessionfinish(session, exitstatus):
    """The session's home goes with the session: it holds a converted copy of the bundled model
    (1.2 GB after a full run), and every `./studio test` used to leave one in the temp folder."""
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _quiet_machine(request):
    """A timing test waits for the background bundle build to end (when this session started one)."""
    if request.node.get_closest_marker("quiet_machine") and bundle_build.running():
        bundle_build.wait()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty SQUEEZE_HOME (own ledger and workspace), sharing the converted-model cache."""
    h = tmp_path / "home"
    (h / "cache").mkdir(parents=True)
    shared_models = _SESSION_HOME / "cache" / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    (h / "cache" / "models").symlink_to(shared_models, target_is_directory=True)
    monkeypatch.setenv("SQUEEZE_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 384) trained in a second on the shipped calibration text;
    like SmolLM2's, it starts every text with BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = (ROOT / "resources" / "data" / "calib.txt").read_text(encoding="utf-8")
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, 60_000, 2000)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(d)
    return d


def make_tiny_llama(path: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised Llama, small enough for seconds-long tests. Hidden 96 and FFN 160
    are not multiples of 64, so grouped quantizers meet partial last groups, as on SmolLM2."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=384, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tokenizer_dir) -> str:
    """Model id (a folder path) of the tiny random Llama."""
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def short_text(tmp_path_factory) -> Path:
    """About 6 kB of the shipped evaluation slice."""
    p = tmp_path_factory.mktemp("text") / "short.txt"
    p.write_text((ROOT / "resources" / "data" / "eval.txt").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return p


@pytest.fixture
def tiny_eval(short_text) -> dict:
    """Eval settings that take about a second on the tiny model."""
    return dict(text=str(short_text), max_tokens=512, context=128, prompt_tokens=16, new_tokens=8, repeats=1)
