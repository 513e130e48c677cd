"""Export to ONNX (optimum-onnx, text-generation-with-past), optional int8, and verification of
the written file in onnxruntime: perplexity on the torch evaluation's windows, prefill/decode
speed, size. A folder appears at `out` only when complete: everything is written to a hidden
sibling first and renamed at the end; on error or cancel the sibling is removed.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Callable

from ..errors import Cancelled, ExportError, SqueezeError
from . import quantize as qz
from .. import roofline
from . import ort_runner as rt

PARITY_LIMIT = 0.01        # unquantized export: verified ppl within 1 % of the torch model's
INT8_PPL_LIMIT = 1.05      # int8: verified ppl <= 1.05x the torch model's ppl ...
INT8_SIZE_LIMIT = 0.30     # ... and model files <= 0.3x the fp32 ONNX export
INT4_PPL_LIMIT = 1.03      # int4: the variant's own 4-bit codes, so close to its torch ppl ...
INT4_SIZE_LIMIT = 0.22     # ... and model files <= 0.22x the fp32 ONNX export
LIMITS = {"int8": (INT8_PPL_LIMIT, INT8_SIZE_LIMIT), "int4": (INT4_PPL_LIMIT, INT4_SIZE_LIMIT)}
SAME_QUALITY = PARITY_LIMIT  # int8 paths within 1 % ppl of the best count as equally good: the
                             # parity limit, what the export already treats as "the same model"
TOO_SLOW = 0.25  # a passing path decoding under this share of the fastest passing one is not chosen
MODEL_FILE = "model.onnx"
# Greedy-generation parity: the export must continue these prompts exactly as the torch model does
# for the first PARITY_TOKENS tokens (a lossless export fails otherwise; a quantized one reports it).
PARITY_PROMPTS = ("The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,")
PARITY_TOKENS = 8


def export_onnx(model, tok, out, quantize: str | None = None, opset: int | None = None, settings=None,
                torch_numbers: dict | None = None, progress: Callable | None = None,
                check_cancel: Callable[[], None] | None = None, log: Callable | None = None,
                candidates: tuple | None = None, fused: bool = True) -> dict:
    """Export `model` (float32 causal LM, eval mode) with `tok` into the folder `out` and verify the
    written file in onnxruntime on `settings`' text. Returns path, folder, size_bytes (model.onnx +
    external data), fp32_size_bytes, ppl_onnx, tokens_scored_onnx, decode/prefill_tokens_per_s_onnx,
    quantize, quant_path (chosen candidate or None), candidates (one row per quantized path tried), graph
    (which writer made the graph: FUSED or TRACED, see _export_fp32), ok and failure. A quality
    failure is reported (ok False, failure says why), not raised; anything that
    stops the export raises ExportError with one line (or Cancelled), leaving nothing at `out`."""
    from ..evaluate import EvalSettings

    if quantize not in (None, "int8", "int4"):
        raise ExportError(f"unknown quantization {quantize!r} for ONNX export; use int8, int4 or none")
    settings = settings or EvalSettings()
    torch_numbers = torch_numbers or {}
    progress = progress or (lambda stage, f, note="": None)
    check = check_cancel or (lambda: None)
    log = log or (lambda text, level="info": None)
    out = Path(out)
    parity = parity_reference(model, tok)
    bw = roofline.bandwidth()
    torch_bpt = roofline.torch_bytes_per_token(model)
    stage, made = _staging_dir(out)
    try:
        progress("export", 0.0, "writing the ONNX graph")
        graph_used, graph_note = _export_fp32(model, tok, stage, opset, fused)
        log(f"ONNX graph: {graph_used}" + (f" ({graph_note})" if graph_note else ""))
        check()
        fp32_file = stage / MODEL_FILE
        fp32_size = model_bytes(fp32_file)
        progress("export", 1.0, f"{fp32_size / 1e6:.1f} MB fp32")
        windows, bos, prompt = _verification_tokens(tok, settings)
        if quantize is None:
            if graph_used == FUSED:
                from . import graph
                graph.fuse_file(fp32_file)  # q/k/v and gate/up as one MatMul each (after sizing: same bytes)
            res = _verify_fp32(fp32_file, windows, bos, prompt, parity, settings, torch_numbers, progress, check)
        else:
            res = _quantized(quantize, fp32_file, stage, candidates or qz.CANDIDATES_FOR[quantize],
                             getattr(model, "squeeze_packed", None), windows, bos, prompt, parity, settings,
                             torch_numbers, progress, check, log)
        res.update(fp32_size_bytes=fp32_size, quantize=quantize, graph=graph_used, graph_note=graph_note,
                   bandwidth_bytes_per_s=bw,
                   torch_bytes_per_token=torch_bpt, roofline_tokens_per_s_torch=bw / torch_bpt,
                   parity_prompts=list(PARITY_PROMPTS), generation_torch=parity["torch"])
        zeros = _zero_fraction(model)
        if zeros >= SPARSE_NOTE_OVER:  # say what onnxruntime does with the zeros, and the honest saving
            progress("verify", 1.0, "measuring the zipped size")
            res["zero_fraction"] = zeros
            res["zip_size_bytes"] = _zipped_bytes(stage / MODEL_FILE)
            res["note"] = (f"{zeros * 100:.0f} % of the weights are zero, but onnxruntime's CPU kernels do not exploit "
                           "unstructured sparsity: the file stores them densely. Compressed (zip) it is "
                           f"{res['zip_size_bytes'] / 1e6:.1f} MB")
            log(res["note"])
        res["bytes_per_token"] = roofline.onnx_bytes_per_token(stage / MODEL_FILE)  # the file kept
        for r in [res] + [c for c in res["candidates"] if c.get("bytes_per_token")]:
            r["roofline_tokens_per_s"] = bw / r["bytes_per_token"]
            r["roofline_fraction"] = r["decode_tokens_per_s_onnx"] / r["roofline_tokens_per_s"]
        if torch_numbers.get("decode_tokens_per_s"):
            res["roofline_fraction_torch"] = torch_numbers["decode_tokens_per_s"] / res["roofline_tokens_per_s_torch"]
        shutil.copyfile(Path(rt.__file__), stage / "generate.py")  # runs the export without torch
        (stage / "verification.json").write_text(json.dumps(
            {**res, "ppl_torch": torch_numbers.get("ppl"), "settings": settings.to_dict()}, indent=2, default=str))
        check()
        _publish(stage, out)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        for d in reversed(made):  # parent folders this export created
            try:
                d.rmdir()
            except OSError:
                pass
        if not isinstance(e, Exception) or isinstance(e, (SqueezeError, MemoryError)):
            raise  # cancel, interrupts and the project's own one-line errors pass through
        if isinstance(e, OSError):
            raise ExportError(f"cannot write the export to {out}: {e.strerror or e}") from None
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {_first_line(e)}") from e
    res["path"] = str(out / MODEL_FILE)
    res["folder"] = str(out)
    res["size_bytes"] = model_bytes(out / MODEL_FILE)
    log(f"exported {res['path']} ({res['size_bytes'] / 1e6:.1f} MB): "
        + ("verified" if res["ok"] else f"NOT verified: {res['failure']}"))
    return res


# ------------------------------------------------------------------ steps

FUSED = "onnxruntime fused (GroupQueryAttention, SkipSimplifiedLayerNormalization)"
TRACED = "optimum-onnx traced (standard ONNX ops)"


def _export_fp32(model, tok, folder: Path, opset: int | None, fused: bool = True) -> tuple[str, str | None]:
    """Writes folder/model.onnx in fp32 -> (which graph, why not the fused one or None).
    The fused graph (core/export/graph.py) decodes faster in onnxruntime; the traced one runs in any
    ONNX runtime and covers every architecture optimum-onnx knows."""
    from . import graph

    why = None if fused else "a portable graph was asked for"
    if why is None and opset is not None and opset < graph.MIN_OPSET:
        why = f"opset {opset} is below {graph.MIN_OPSET}"
    why = why or graph.supported(model)
    if why is None:
        graph.build(model, folder, opset)
        tok.save_pretrained(folder)
        return FUSED, None
    _export_traced(model, tok, folder, opset)
    return TRACED, why


def _export_traced(model, tok, folder: Path, opset: int | None) -> None:
    import logging

    from optimum.exporters.onnx import onnx_export_from_model

    quiet = [logging.getLogger(n) for n in ("optimum", "optimum.exporters", "optimum.exporters.onnx")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:  # optimum logs tied-weight notes and validation hints as warnings
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            # torch.onnx's legacy exporter and the tracer warn about every data-dependent branch of
            # the HF code; they are expected for this export and say nothing to the user.
            warnings.simplefilter("ignore")
            onnx_export_from_model(model, folder, task="text-generation-with-past", opset=opset,
                                   do_validation=False)  # we verify ourselves, on real text
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    if not (folder / MODEL_FILE).is_file():
        raise ExportError("the ONNX exporter wrote no model.onnx; this model type may not be supported")
    tok.save_pretrained(folder)  # tokenizer.json next to the model: the export stands alone


def _verification_tokens(tok, settings):
    """The torch evaluation's windows (and BOS), and its decode prompt."""
    from ..evaluate import read_text, token_windows

    text = settings.text_path()
    windows, bos = token_windows(tok, text, settings.max_tokens, settings.context)
    flat = [t for w in windows for t in w]
    if len(flat) >= settings.prompt_tokens:
        prompt = flat[:settings.prompt_tokens]   # == the first prompt_tokens of the text
    else:
        prompt = tok(read_text(text), add_special_tokens=False)["input_ids"][:settings.prompt_tokens]
    return windows, bos, prompt


def parity_reference(model, tok) -> dict:
    """The parity prompts' ids and the torch model's greedy continuations of them."""
    from ..evaluate import greedy
    prompts = [tok(p)["input_ids"] for p in PARITY_PROMPTS]  # as generate.py encodes a prompt
    return {"prompts": prompts, "torch": [greedy(model, p, PARITY_TOKENS) for p in prompts]}


def verify(path: Path, windows, bos, prompt, settings, progress=None, check=None, parity=None) -> dict:
    """Runs the model file in onnxruntime: ppl on `windows`, greedy continuations of the parity
    prompts (compared with torch's), then prefill/decode speed."""
    try:
        lm = rt.CausalLM(path)
    except Exception as e:  # a file onnxruntime refuses is an export failure, said in one line
        raise ExportError(f"onnxruntime cannot load {path.name}: {_first_line(e)}") from None
    p = rt.perplexity(lm, windows, bos, progress=(lambda f: progress(0.8 * f)) if progress else None,
                      check_cancel=check)
    gen = {}
    if parity:
        got = [rt.greedy(lm, ids, PARITY_TOKENS) for ids in parity["prompts"]]
        first = [next((i for i, (a, b) in enumerate(zip(g, t)) if a != b), None) for g, t in zip(got, parity["torch"])]
        gen = {"generation_onnx": got, "generation_first_diff": first,
               "generation_match": sum(f is None for f in first) / len(first)}
    s = rt.decode_speed(lm, prompt, settings.new_tokens, settings.repeats, check_cancel=check)
    if progress:
        progress(1.0)
    return {**gen, "ppl_onnx": p["ppl"], "tokens_scored_onnx": p["tokens_scored"],
            "decode_tokens_per_s_onnx": s["decode_tokens_per_s"],
            "prefill_tokens_per_s_onnx": s["prefill_tokens_per_s"]}


def _verify_fp32(fp32_file, windows, bos, prompt, parity, settings, torch_numbers, progress, check) -> dict:
    progress("verify", 0.0, "onnxruntime: perplexity")
    res = verify(fp32_file, windows, bos, prompt, settings, lambda f: progress("verify", f, "onnxruntime"), check,
                 parity)
    failure = _parity_failure(res, torch_numbers) or _generation_failure(res)
    return {**res, "quant_path": None, "candidates": [], "ok": failure is None, "failure": failure}


def _parity_failure(res: dict, torch_numbers: dict) -> str | None:
    ppl_t = torch_numbers.get("ppl")
    if ppl_t is None:
        return None
    if torch_numbers.get("tokens_scored") not in (None, res["tokens_scored_onnx"]):
        return (f"onnxruntime scored {res['tokens_scored_onnx']} tokens, the torch evaluation "
                f"{torch_numbers['tokens_scored']}: the windows differ")
    off = abs(res["ppl_onnx"] / ppl_t - 1)
    if not off <= PARITY_LIMIT:  # also catches NaN
        return (f"verified perplexity {res['ppl_onnx']:.4g} is {off * 100:.1f} % off the torch model's "
                f"{ppl_t:.4g} (limit {PARITY_LIMIT * 100:g} %)")
    return None


def _generation_failure(res: dict) -> str | None:
    """A lossless export must continue every parity prompt exactly as torch does."""
    bad = [(PARITY_PROMPTS[i], f) for i, f in enumerate(res.get("generation_first_diff") or []) if f is not None]
    if not bad:
        return None
    p, f = bad[0]
    return (f"greedy generation differs from the torch model's at token {f + 1} of {PARITY_TOKENS} for "
            f"{len(bad)} of {len(PARITY_PROMPTS)} prompts (first: {p!r})")


def _quantized(target, fp32_file, stage, candidates, packed, windows, bos, prompt, parity, settings, torch_numbers,
               progress, check, log) -> dict:
    """Quantizes with every candidate, verifies each, keeps the chosen one as model.onnx."""
    if not candidates:
        raise ExportError(f"no {target} candidates to try")
    ppl_limit, size_limit = LIMITS[target]
    fp32_size = float_bytes(fp32_file)
    ref_ppl = torch_numbers.get("ppl")
    work = stage / ".candidates"
    rows, verified = [], {}
    n = len(candidates)
    for i, c in enumerate(candidates):
        f = lambda x, note, i=i, c=c: progress("verify", (i + x) / n, f"{c.name}: {note}")
        f(0.0, "quantizing")
        dst = work / c.name / MODEL_FILE
        dst.parent.mkdir(parents=True)
        try:
            how = qz.quantize(fp32_file, dst, c, packed)
            check()
            f(0.15, "verifying")
            m = verify(dst, windows, bos, prompt, settings, lambda x, f=f: f(0.15 + 0.85 * x, "verifying"), check,
                       parity)
        except (Cancelled, MemoryError):
            raise
        except Exception as e:  # one path that breaks is a rejected path, not a failed export
            rows.append({"name": c.name, "method": c.describe(), "ppl_onnx": None, "size_bytes": None,
                         "decode_tokens_per_s_onnx": None, "ppl_ratio": None, "size_ratio": None, "accepted": False,
                         "reason": f"failed: {type(e).__name__}: {_first_line(e)}"})
            log(f"{target} candidate {c.name}: {rows[-1]['reason']}", "warning")
            continue
        size = model_bytes(dst)
        m["bytes_per_token"] = roofline.onnx_bytes_per_token(dst)
        row = {"name": c.name, "method": c.describe(), **m, **how, "size_bytes": size,
               "ppl_ratio": m["ppl_onnx"] / ref_ppl if ref_ppl else None, "size_ratio": size / fp32_size}
        row["reason"] = _bounds_reason(row, ppl_limit, size_limit)
        row["accepted"] = False
        rows.append(row)
        verified[c.name] = dst
        log(f"{target} candidate {c.name}: ppl {m['ppl_onnx']:.4g}"
            + (f" ({row['ppl_ratio']:.3f}x fp32)" if ref_ppl else "")
            + f", {size / 1e6:.1f} MB ({row['size_ratio']:.3f}x), decode {m['decode_tokens_per_s_onnx']:.1f} tok/s: "
            + (row["reason"] or "passes"))
    if not verified:
        raise ExportError(f"{target} quantization failed on every path: " + "; ".join(r["reason"] for r in rows))
    chosen = choose(rows)
    keep = chosen or _closest(rows)
    if chosen:
        n_pass = sum(r["reason"] is None for r in rows)
        chosen["accepted"] = True
        chosen["reason"] = "chosen: " + ("the only path that passes" if n_pass == 1
                                         else "passes; fastest of the best-quality paths")
    for r in rows:
        if r["reason"] is None and r is not chosen:
            r["reason"] = "passes, not chosen: " + _why_not(r, chosen)
    _replace_model(stage, verified[keep["name"]])
    shutil.rmtree(work)
    # one sentence for the user; each path's numbers are in the log lines above
    failure = None if chosen else (f"the {target} file misses its bounds: its " + keep["reason"].removeprefix("rejected: ")
                                   + (f" (the closest of {len(rows)} ways tried; the job's log lists each)"
                                      if len(rows) > 1 else "")
                                   + _rtn_hint(target, keep))
    res = {k: keep[k] for k in ("ppl_onnx", "tokens_scored_onnx", "decode_tokens_per_s_onnx", "prefill_tokens_per_s_onnx",
                                "generation_onnx", "generation_first_diff", "generation_match",
                                "engine_matmuls", "rtn_matmuls")}
    return {**res, "quant_path": chosen["name"] if chosen else None, "candidates": rows,
            "ok": chosen is not None, "failure": failure, "ppl_ratio_fp32": keep["ppl_ratio"],
            "size_ratio_fp32": keep["size_ratio"]}


def _bounds_reason(row: dict, ppl_limit: float = INT8_PPL_LIMIT, size_limit: float = INT8_SIZE_LIMIT) -> str | None:
    """Why a candidate fails the bounds, or None if it passes."""
    why = []
    if row["ppl_ratio"] is not None and not row["ppl_ratio"] <= ppl_limit:
        why.append(f"ppl {row['ppl_ratio']:.3f}x the torch model (limit {ppl_limit}x)")
    if not row["size_ratio"] <= size_limit:
        why.append(f"size {row['size_ratio']:.3f}x fp32 ONNX (limit {size_limit}x)")
    return ("rejected: " + ", ".join(why)) if why else None


def _rtn_hint(target: str, row: dict) -> str:
    """What to do when int4 had to re-quantize float weights by RTN."""
    if target != "int4" or not row.get("rtn_matmuls"):
        return ""
    return (f". {row['rtn_matmuls']} MatMuls had no 4-bit codes in the variant and were re-quantized by "
            "onnxruntime's RTN; apply gptq (or awq / rtn) 4-bit in the recipe first so the export keeps "
            "that quality")


def choose(rows: list[dict]) -> dict | None:
    """Quality first, then speed: of the passing paths, those within SAME_QUALITY of the best
    verified ppl, the fastest decoder. A path that decodes at under a quarter of the fastest passing
    one is never the pick, whatever its ppl: on SmolLM2, 8-bit MatMulNBits with float compute scores
    ~0.5-1.5 % lower ppl than with int8 compute (noise on a short text) but decodes 3.9 vs 107 tok/s."""
    ok = [r for r in rows if r["reason"] is None]
    if not ok:
        return None
    fastest = max(r["decode_tokens_per_s_onnx"] for r in ok)
    ok = [r for r in ok if r["decode_tokens_per_s_onnx"] >= TOO_SLOW * fastest]
    best = min(r["ppl_onnx"] for r in ok)
    tied = [r for r in ok if r["ppl_onnx"] <= best * (1 + SAME_QUALITY)]
    return max(tied, key=lambda r: r["decode_tokens_per_s_onnx"])


def _why_not(r: dict, chosen: dict) -> str:
    if r["ppl_onnx"] > chosen["ppl_onnx"] * (1 + SAME_QUALITY):
        return f"ppl {r['ppl_onnx']:.4g} vs {chosen['ppl_onnx']:.4g}"
    return f"decode {r['decode_tokens_per_s_onnx']:.1f} vs {chosen['decode_tokens_per_s_onnx']:.1f} tok/s"


def _closest(rows: list[dict]) -> dict:
    """When nothing passes, the file written is the best-quality one (reported as a failure)."""
    return min((r for r in rows if r["ppl_onnx"] is not None), key=lambda r: (r["ppl_onnx"], r["size_bytes"]))


# ------------------------------------------------------------------ files

SPARSE_NOTE_OVER = 0.30  # zero weights from which the export reports the zipped size (a 4-bit grid alone
                         # rounds ~15 % of weights to zero: that is not pruning)


def _zero_fraction(model) -> float:
    """Share of exact zeros in the decoder's 2-D weights (unstructured / N:M pruning leaves them)."""
    import torch
    zeros = total = 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in f".{n}":
                zeros += int((p == 0).sum())
                total += p.numel()
    return zeros / total if total else 0.0


def _zipped_bytes(model_file: Path) -> int:
    """Bytes of the model files deflated (zip's method, fast level), streamed: what the zeros save
    on disk or on the wire when the folder is compressed."""
    import zlib
    n = 0
    for p in sorted(model_file.parent.glob(model_file.name + "*")):
        z = zlib.compressobj(1)
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                n += len(z.compress(chunk))
        n += len(z.flush())
    return n


def float_bytes(model_file: Path) -> int:
    """The file's size were every weight float32: what the int8 / int4 size bounds compare to (a W8A8
    variant's own export already holds int8 weights; for any other it is the file's size)."""
    import numpy as np
    import onnx
    m = onnx.load(str(model_file), load_external_data=False)
    narrow = sum(int(np.prod(t.dims)) * 3 for t in m.graph.initializer
                 if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
    return model_bytes(model_file) + narrow


def model_bytes(model_file: Path) -> int:
    """The model file plus its external-data file(s) (model.onnx, model.onnx_data, ...)."""
    return sum(p.stat().st_size for p in model_file.parent.glob(model_file.name + "*") if p.is_file())


def _replace_model(folder: Path, src: Path) -> None:
    for p in folder.glob(MODEL_FILE + "*"):
        p.unlink()
    for p in src.parent.glob(src.name + "*"):
        os.replace(p, folder / p.name)


def _staging_dir(out: Path) -> tuple[Path, list[Path]]:
    """A hidden sibling of `out` (same file system, so the final rename is atomic); also returns
    the parent folders created for it, to remove them again on failure."""
    made, p = [], out.parent
    while not p.exists():
        made.append(p)
        p = p.parent
    try:
        for d in reversed(made):
            d.mkdir()
        stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
    except OSError as e:
        for d in made:
            try:
                d.rmdir()
            except OSError:
                pass
        raise ExportError(f"cannot write the export to {out}: {e.strerror or e}") from None
    return stage, list(reversed(made))


def _publish(stage: Path, out: Path) -> None:
    """Moves the finished folder to `out`: into an empty folder's place, or replacing an earlier
    export there (run.py only lets through new, empty, or earlier-export folders)."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(stage, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__
