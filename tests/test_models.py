"""Model sources: a hub id is only ever read from the local cache; bad inputs get one clear line."""
import shutil

import pytest

from core import models
from core.errors import ModelError


def test_a_hub_id_in_the_local_cache_loads_offline(tiny_model, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model, snap)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    assert models.source_of("acme/tiny-llama") == "hub"
    info = models.info("acme/tiny-llama")
    assert info.params > 100_000 and info.layers == 2
    model, tok, d = models.load("acme/tiny-llama")
    assert d == snap and model.config.hidden_size == 96
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        models.resolve("acme/not-downloaded")


def test_a_broken_gguf_file_is_one_clear_error(tmp_path, home):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match="cannot read GGUF file broken.gguf"):
        models.resolve(str(f))
    assert not [p for p in (home / "cache" / "models").iterdir() if "broken" in p.name]
    with pytest.raises(ModelError, match="no GGUF file"):
        models.resolve(str(tmp_path / "missing.gguf"))


def test_model_facts_come_from_the_file_headers(tiny_model):
    i = models.info(tiny_model)
    assert (i.source, i.layers, i.dtype, i.hidden_size) == ("folder", 2, "F32", 96)
    assert i.size_bytes == (models.resolve(tiny_model) / "model.safetensors").stat().st_size
