"""One job, start to end: load -> apply each step -> save -> load back -> evaluate
(-> export -> verify). Emits the event contract; never raises."""
from __future__ import annotations

import gc
import time
import traceback
from pathlib import Path
from typing import Callable

from .. import evaluate as ev
from .. import models, paths
from ..errors import Cancelled, DataError, SqueezeError
from ..export.folder import check_export_folder
from ..recipe import Recipe, from_data
from ..reuse import code_stamp, link_copy, saved_prefix, stamp_manifest, state_key
from ..techniques.base import StepContext
from ..variant import count_params, load_variant, read_manifest, save_variant
from .events import Emitter
from .spec import JobSpec

EVAL_WEIGHTS = {"load": 0.05, "apply": 0.15, "save": 0.05, "evaluate": 0.75}
EXPORT_WEIGHTS = {"load": 0.05, "apply": 0.05, "save": 0.05, "evaluate": 0.25, "export": 0.3, "verify": 0.3}
COMPARE_WEIGHTS = {"load": 0.4, "generate": 0.6}
WEIGHT_VIEW_WEIGHTS = {"load": 0.7, "histograms": 0.3}
SCAN_WEIGHTS = {"load": 0.05, "scan": 0.95}
WEIGHTS = {"eval": EVAL_WEIGHTS, "export": EXPORT_WEIGHTS, "compare": COMPARE_WEIGHTS, "weights": WEIGHT_VIEW_WEIGHTS,
           "sensitivity": SCAN_WEIGHTS}


def run_job(spec: JobSpec, sink: Callable[[dict], None], cancelled: Callable[[], bool] = lambda: False) -> None:
    em = Emitter(sink, spec.job_id, WEIGHTS.get(spec.kind, EVAL_WEIGHTS))
    em.started()
    try:
        pre = _preflight(spec, em)
        if spec.kind == "eval":
            payload = evaluate_job(spec, em, cancelled)
        elif spec.kind == "export":
            payload = export_job(spec, em, cancelled)
        elif spec.kind == "compare":
            payload = compare_job(spec, em, cancelled)
        elif spec.kind == "weights":
            payload = weights_job(spec, em, cancelled)
        elif spec.kind == "sensitivity":
            payload = sensitivity_job(spec, em, cancelled)
        else:
            raise SqueezeError(f"unknown job kind {spec.kind!r}")
        if pre:
            payload["preflight"] = pre  # beside the measured peak RSS and seconds: later estimates learn
        em.result(payload)
    except Cancelled:
        em.cancelled()
    except SqueezeError as e:
        em.error(e.kind, str(e))
    except MemoryError:
        em.error("memory", "out of memory: close other programs, or use a smaller model or fewer tokens")
    except Exception as e:  # a bug: say so plainly, keep the traceback in the log
        em.log(traceback.format_exc(), level="debug")
        em.error("internal", f"internal error: {type(e).__name__}: {e}")
    finally:
        em.finished()


def _preflight(spec: JobSpec, em: Emitter) -> dict:
    """Estimate RAM / disk / time; refuse (PreflightError) what cannot fit on this machine."""
    if spec.kind not in ("eval", "export"):
        return {}
    from .. import preflight
    try:
        est = preflight.for_spec(spec)
    except SqueezeError:
        return {}  # a model that cannot be read fails in the job itself, with its own message
    if est:
        em.log(f"preflight: ≈ {est['ram_bytes'] / 1e9:.1f} GB RAM, ≈ {est['disk_bytes'] / 1e9:.2f} GB disk, "
               f"≈ {est['seconds']:.0f} s")
        preflight.check(est, paths.workspace_dir())
    return est


def _checker(cancelled):
    def check():
        if cancelled():
            raise Cancelled()
    return check


def _check_positions(spec: JobSpec, model_dir: Path) -> None:
    """Windows and the decode benchmark fit the model's positions (past them, RoPE models
    extrapolate badly and the numbers would mean nothing), said before the model loads."""
    import json
    try:
        limit = int(json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings") or 0)
    except (OSError, ValueError):
        return  # an unreadable config fails in the load, with its own message
    s = spec.eval_settings()
    if limit and s.context + 1 > limit:  # + the BOS token
        raise DataError(f"context {s.context} is longer than the model's {limit} positions: use {limit - 1} or less")
    if limit and s.prompt_tokens + s.new_tokens > limit:
        raise DataError(f"the decode benchmark's {s.prompt_tokens} prompt + {s.new_tokens} new tokens exceed the "
                        f"model's {limit} positions: lower them")


def build_variant(spec: JobSpec, recipe: Recipe, em: Emitter, check) -> tuple[Path | None, object, object, Path]:
    """Loads the model and applies the recipe. Returns (variant_dir or None, model, tokenizer, base_dir);
    with steps, the returned model is the saved variant loaded back (what is measured is the file)."""
    em.progress("load", 0.0, spec.model)
    recipe.check_files()
    steps = recipe.to_dict()["steps"]
    base_dir = models.resolve(spec.model)
    _check_positions(spec, base_dir)
    saved = saved_prefix(spec.model, base_dir, steps) if spec.reuse and steps else None
    if saved:
        done, k, man = saved
        em.log(f"reusing the saved variant {done.name}: its {k} step(s) match the start of this recipe "
               "(run with --fresh to recompute)")
        model, tok = load_variant(done)
    else:
        model, tok, base_dir = models.load(spec.model)
        k, man = 0, {"steps": []}
    em.progress("load", 1.0)
    check()
    if not recipe.steps:
        return None, model, tok, base_dir
    infos = [{**info, "reused_from": done.name} for info in man["steps"]] if saved else []
    out = paths.workspace_dir() / "variants" / spec.job_id
    if k == len(steps):  # the whole recipe: the same file under this job's name
        em.progress("save", 0.0)
        link_copy(done, out)
        stamp_manifest(out, {"steps": infos})
        em.progress("save", 1.0)
        return out, model, tok, base_dir
    ctx = StepContext(cancelled=lambda: check() or False, log=em.log, tokenizer=tok)
    # distill's teacher is the model before the recipe: reloaded from the model id only when a step
    # asks for it, so other recipes keep one copy in memory and no technique changes
    ctx.base_model = lambda: models.load(spec.model)[0]
    ctx.metric = em.metric  # numeric series (distill's loss curve) as "metric" events
    for i, step in enumerate(recipe.steps[k:], start=k):
        n = len(recipe.steps)
        ctx.state_key = state_key(spec.model, base_dir, steps[:i])
        ctx._progress = lambda f, note="", eta_s=None, i=i: em.progress("apply", (i + f) / n, f"{step.name}: {note}",
                                                                         eta_s)
        em.log(f"applying {step.label()}")
        t0 = time.perf_counter()
        info = step.technique.apply(model, step.config, ctx) or {}
        infos.append({"technique": step.name, "seconds": round(time.perf_counter() - t0, 2), **info})
        check()
    em.progress("save", 0.0)
    save_variant(model, tok, ctx.packed, ctx.runtime, out,
                 {"base_model": spec.model, "recipe": recipe.to_dict(), "steps": infos,
                  "state_key": state_key(spec.model, base_dir, steps), "code": code_stamp()})
    del model, ctx
    gc.collect()
    model, tok = load_variant(out)  # measure what was saved, not what is in memory
    em.progress("save", 1.0)
    return out, model, tok, base_dir


def measure(model, tok, settings: ev.EvalSettings, em: Emitter, check, stage: str = "evaluate") -> dict:
    text = settings.text_path()
    from ..techniques.early_exit import layers_per_token
    ppl = ev.perplexity(model, tok, text, settings.max_tokens, settings.context,
                        progress=lambda f: em.progress(stage, 0.8 * f, "perplexity"), check_cancel=check)
    exits = {"eval_layers_per_token": layers_per_token(model)}  # early exit: None otherwise
    em.progress(stage, 0.8, "decode speed")
    speed = ev.decode_speed(model, tok, text, settings.prompt_tokens, settings.new_tokens,
                            settings.repeats, check_cancel=check)
    exits["decode_layers_per_token"] = layers_per_token(model, "decode")
    from .. import roofline
    bpt = roofline.torch_bytes_per_token(model)
    speed.update(bytes_per_token=bpt, roofline_tokens_per_s=roofline.bound(bpt))
    speed["roofline_fraction"] = speed["decode_tokens_per_s"] / speed["roofline_tokens_per_s"]
    em.progress(stage, 1.0)
    return {**speed, **ppl, **{k: v for k, v in exits.items() if v is not None}}  # a KV technique's bytes per token: ppl's (a whole window) over decode's


def evaluate_job(spec: JobSpec, em: Emitter, cancelled) -> dict:
    t0 = time.perf_counter()
    check = _checker(cancelled)
    recipe = from_data(spec.recipe)
    settings = spec.eval_settings()
    ev.read_text(settings.text_path())  # fail fast on a bad text, before loading anything
    variant, model, tok, base_dir = build_variant(spec, recipe, em, check)
    payload = {"model": spec.model, "recipe": recipe.to_dict(), "label": recipe.label(),
               "variant_dir": str(variant) if variant else None}
    if variant:
        man = read_manifest(variant)
        payload.update(size_bytes=models.size_on_disk(variant), theoretical_bytes=man["theoretical_bytes"],
                       params=man["params"], nonzero_params=man["nonzero_params"], steps=man["steps"])
    else:
        params, nonzero = count_params(model)
        payload.update(size_bytes=models.size_on_disk(base_dir), theoretical_bytes=nonzero * 4,
                       params=params, nonzero_params=nonzero, steps=[])
    if spec.evaluate:
        payload.update(measure(model, tok, settings, em, check))
    payload["peak_rss_bytes"] = ev.peak_rss_bytes()
    payload["seconds"] = round(time.perf_counter() - t0, 2)
    return payload


def export_job(spec: JobSpec, em: Emitter, cancelled) -> dict:
    """Export the recipe's variant (rebuilt, or the parent run's saved one) to ONNX and verify it."""
    from ..export.onnx import export_onnx

    t0 = time.perf_counter()
    check = _checker(cancelled)
    opts = dict(spec.export or {})
    recipe = from_data(spec.recipe)
    settings = spec.eval_settings()
    ev.read_text(settings.text_path())
    out = Path(opts.get("out") or paths.workspace_dir() / "exports" / spec.job_id).expanduser()
    check_export_folder(out)
    src = opts.get("variant_dir")
    if src and Path(src, "squeeze.json").is_file():
        em.progress("load", 0.0, src)
        model, tok = load_variant(Path(src))
        em.progress("save", 1.0)
    else:
        _, model, tok, _ = build_variant(spec, recipe, em, check)
    torch_numbers = measure(model, tok, settings, em, check)
    res = export_onnx(model, tok, out, quantize=opts.get("quantize"), opset=opts.get("opset"),
                      fused=opts.get("graph", "fused") == "fused", settings=settings, torch_numbers=torch_numbers,
                      progress=lambda stage, f, note="": em.progress(stage, f, note),
                      check_cancel=check, log=em.log)
    res.update(model=spec.model, recipe=recipe.to_dict(), label=recipe.label(),
               ppl_torch=torch_numbers["ppl"], decode_tokens_per_s_torch=torch_numbers["decode_tokens_per_s"],
               prefill_tokens_per_s_torch=torch_numbers["prefill_tokens_per_s"],
               peak_rss_bytes=ev.peak_rss_bytes(), seconds=round(time.perf_counter() - t0, 2))
    return res


def sensitivity_job(spec: JobSpec, em: Emitter, cancelled) -> dict:
    """Δ perplexity of one technique applied to one Linear at a time (layers × module types)."""
    from ..sensitivity import check_setting, scan
    check = _checker(cancelled)
    c = dict(spec.compare or {})
    technique = c.get("technique", "rtn")
    check_setting(technique, c.get("setting", 4), c.get("group_size", 64))
    settings = spec.eval_settings()
    ev.read_text(settings.text_path())
    em.progress("load", 0.0, spec.model)
    model, tok, _ = models.load(spec.model)
    check()
    em.progress("scan", 0.0, "caching every layer's input")
    return scan(model, tok, settings.text_path(), technique, c.get("setting", 4), settings.max_tokens,
                settings.context, c.get("group_size", 64), lambda f, note="": em.progress("scan", f, note), check,
                c.get("precision", "auto"))


def weights_job(spec: JobSpec, em: Emitter, cancelled) -> dict:
    """Weight histograms before / after and bits / sparsity per Linear of one saved variant."""
    from ..weights import compare
    check = _checker(cancelled)
    d = (spec.compare or {}).get("variant_dir")
    if not d or not Path(d, "squeeze.json").is_file():
        raise SqueezeError("this run has no saved variant to look at (the baseline is the model itself); pick a run "
                           "with a recipe")
    em.progress("load", 0.0, "base model")
    base, _, _ = models.load(spec.model)
    check()
    em.progress("load", 0.5, "variant")
    variant, _ = load_variant(Path(d))
    check()
    em.progress("histograms", 0.0)
    res = compare(base, variant, getattr(variant, "squeeze_packed", {}), check)
    res["label"] = (spec.compare or {}).get("label")
    return res


def compare_job(spec: JobSpec, em: Emitter, cancelled) -> dict:
    """Side-by-side generation of two runs' models (a saved variant, or the base model)."""
    from ..compare import side_by_side
    check = _checker(cancelled)
    c = dict(spec.compare or {})
    if not (c.get("prompt") or "").strip():
        raise SqueezeError("type a prompt to compare the two models on")
    loaded = {}
    for i, side in enumerate(("reference", "variant")):
        d = (c.get(side) or {}).get("variant_dir")
        em.progress("load", i / 2, side)
        if d and Path(d, "squeeze.json").is_file():
            loaded[side] = load_variant(Path(d))
        elif d:
            raise SqueezeError(f"the {side}'s saved variant is gone ({d}); run it again")
        else:
            model, tok, _ = models.load(spec.model)
            loaded[side] = (model, tok)
        check()
    em.progress("generate", 0.0, "both models, greedy")
    res = side_by_side(loaded["reference"][0], loaded["variant"][0], loaded["reference"][1], c["prompt"],
                       int(c.get("new_tokens") or 32), check)
    em.progress("generate", 1.0)
    res["labels"] = {s: (c.get(s) or {}).get("label") for s in ("reference", "variant")}
    return res

