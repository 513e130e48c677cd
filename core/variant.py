"""A variant on disk: model.safetensors (dense tensors + packed low-bit ones), config,
tokenizer, and squeeze.json (base model, recipe, packed-tensor layout, runtime transforms).
Loading it back dequantizes the packed weights: the numbers measured are those of the saved file.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .errors import ModelError
from .packing import QTensor

MANIFEST = "squeeze.json"


def _unique_params(model) -> dict[str, torch.Tensor]:
    """name -> tensor, tied tensors once (the first name wins, as in save_pretrained)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def count_params(model) -> tuple[int, int]:
    """(parameters, non-zero parameters), tied weights counted once."""
    total = nz = 0
    seen = set()
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        nz += int(torch.count_nonzero(p))
    return total, nz


def save_variant(model, tokenizer, packed: dict[str, QTensor], runtime: list[str], out: Path,
                 meta: dict) -> dict:
    """Writes the variant atomically (a .tmp folder renamed at the end). Returns its facts."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        return _write(model, tokenizer, packed, runtime, out, tmp, meta, save_file)
    except BaseException:  # Ctrl-C, a full disk: no half-written folder left behind (job ids never repeat)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(model, tokenizer, packed, runtime, out: Path, tmp: Path, meta: dict, save_file) -> dict:
    params = _unique_params(model)
    # drop the dense copies of packed weights, and anything tied to them (embedding <-> lm_head)
    packed_ptrs = {params[n].untyped_storage().data_ptr() for n in packed if n in params}
    packed_ptrs |= {dict(model.state_dict())[n].untyped_storage().data_ptr() for n in packed}
    tensors: dict[str, torch.Tensor] = {}
    theoretical = 0.0
    for k, v in params.items():
        if k in packed or v.untyped_storage().data_ptr() in packed_ptrs:
            continue
        t = v.detach().contiguous()
        tensors[k] = t
        theoretical += int(torch.count_nonzero(t)) * t.element_size()
    layout = {}
    for name, qt in packed.items():
        tensors.update(qt.tensors(name))
        w = qt.dequantize()
        theoretical += qt.theoretical_bytes(int(torch.count_nonzero(w)))
        layout[name] = qt.meta()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    from .paths import UMASK
    os.chmod(tmp / "model.safetensors", 0o666 & ~UMASK)  # safetensors writes 0600; a lab shares its variants
    model.config.save_pretrained(tmp)
    from .techniques.architecture import write_variant_files
    write_variant_files(model.config, tmp)  # explicit head_dim; low_rank's modeling file
    tokenizer.save_pretrained(tmp)
    total, nonzero = count_params(model)
    manifest = {**meta, "packed": layout, "runtime": list(runtime), "params": total,
                "nonzero_params": nonzero, "theoretical_bytes": int(theoretical), "dtype": "F32"}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return manifest


def read_manifest(d: Path) -> dict:
    try:
        return json.loads((Path(d) / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{d} has an unreadable {MANIFEST}: {e}") from None


def load_variant(d: Path):
    """(model, tokenizer) with packed weights dequantized and runtime transforms applied."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_utils import no_init_weights

    d = Path(d)
    man = read_manifest(d)
    try:
        config = AutoConfig.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        raw = load_file(str(d / "model.safetensors"))
    except Exception as e:
        raise ModelError(f"cannot read the variant in {d}: {str(e).splitlines()[0]}") from None
    packed = {name: QTensor.from_tensors(name, meta, raw) for name, meta in man["packed"].items()}
    state = {k: v for k, v in raw.items() if k.rsplit(".", 1)[0] not in packed}  # packed parts: below
    for name, qt in packed.items():
        state[name] = qt.dequantize()
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        from .techniques.architecture import adapt_to_config
        adapt_to_config(model)  # low_rank: the factored Linears the weights are stored as
        for entry in man.get("runtime", []):
            if entry.startswith("early_exit:"):  # its adapters are stored with the weights
                from .techniques.early_exit import add_adapters
                add_adapters(model, json.loads(entry.split(":", 1)[1]))
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:  # one stored tensor (dense or packed) feeds both the embedding and the LM head
        emb = model.get_input_embeddings().weight
        names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is emb]
        head = [n for n, p in model.named_parameters(remove_duplicate=False)
                if p is model.get_output_embeddings().weight]
        shared = next((state[n] for n in names + head if n in state), None)
        if shared is not None:
            for n in names + head:
                state[n] = shared
    missing, unexpected = model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    if missing or unexpected:
        raise ModelError(f"the variant in {d} does not match its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    model.squeeze_packed = packed  # the stored codes: export writes low-bit ONNX nodes from them
    if "dynamic_int8" in man.get("runtime", []):
        from .techniques.quantization import to_dynamic_int8
        to_dynamic_int8(model, packed)
    for entry in man.get("runtime", []):
        if entry.startswith("rotate:"):
            from .techniques.rotation import attach_from
            attach_from(model, entry)
        if entry.startswith("early_exit:"):
            from .techniques.early_exit import attach_from as attach_exit
            attach_exit(model, entry)
        if entry.startswith(("kv_quant:", "kv_window:")):
            from .techniques.kv_cache import attach_from as attach_kv
            attach_kv(model, entry)
        if entry.startswith("moefy:"):
            from .techniques.moefy import attach_from as attach_moefy
            attach_moefy(model, entry)
    if "w8a8" in man.get("runtime", []):
        from .techniques.smoothquant import to_w8a8
        to_w8a8(model, packed)
    return model, tok
