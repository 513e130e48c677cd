"""`squeeze`: the command-line twin of the app, over the same engine.
With --json, stdout carries exactly one JSON object or list; progress and logs go to stderr."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from .errors import SqueezeError
from .jobs.events import shown_eta


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _fail(msg: str, code: int = 2, as_json: bool = False) -> int:
    sys.stderr.write(f"squeeze: error: {msg}\n")
    if as_json:  # a script reading stdout gets its one object either way
        _print_json({"error": msg, "exit_code": code})
    return code


class _Progress:
    """Progress on stderr: one updating line on a terminal, a line per stage otherwise."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.stage = None

    def __call__(self, e: dict) -> None:
        if self.quiet:
            return
        t = e["type"]
        if t == "progress":
            secs, what = shown_eta(e)
            eta = f", {what}ETA {secs:.0f} s" if secs is not None else ""
            line = f"[{e['fraction'] * 100:5.1f}%] {e['stage']}{eta} {e.get('note') or ''}"
            if self.tty:
                sys.stderr.write("\r" + line[:100].ljust(100))
            elif e["stage"] != self.stage:
                sys.stderr.write(line + "\n")
            self.stage = e["stage"]
        elif t == "log" and e.get("level") != "debug":
            sys.stderr.write(("\n" if self.tty else "") + e["text"] + "\n")
        elif t == "finished" and self.tty:
            sys.stderr.write("\n")


def _eval_settings(a) -> dict:
    from .evaluate import EvalSettings
    d = EvalSettings().to_dict()
    for k in ("text", "max_tokens", "context", "prompt_tokens", "new_tokens", "repeats"):
        v = getattr(a, k, None)
        if v is not None:
            d[k] = str(Path(v).expanduser().resolve()) if k == "text" else v
    EvalSettings(**d).check()
    return d


def _recipe(a) -> dict:
    from . import recipe as rc
    return rc.load(a.recipe).to_dict() if a.recipe else {"steps": []}


def _run(spec, quiet: bool):
    from .jobs.client import run_inline
    from .export.folder import check_export_folder
    from .models import resolve
    # what the job would fail on at once is said before it starts: a typo leaves no failed run in the ledger
    resolve(spec.model, convert=False)
    if spec.kind == "export":
        check_export_folder(Path(spec.export["out"]))
    rec = run_inline(spec, _Progress(quiet))
    if rec.outcome != "done":
        kind, msg = rec.error or ("cancelled", "cancelled")
        raise SqueezeError(msg)
    return rec.result


def cmd_models(a) -> int:
    from .models import known_models
    ms = [m.to_dict() for m in known_models()]
    if a.json:
        _print_json(ms)
    else:
        for m in ms:
            size = f"{m['size_bytes'] / 1e6:.0f} MB" if m["size_bytes"] else ""
            params = f"{m['params'] / 1e6:.1f} M params" if m["params"] else "converted on first use"
            print(f"{m['id']:32} {m['source']:8} {params:16} {size}")
    return 0


def cmd_techniques(a) -> int:
    from .techniques import all_techniques
    ts = [t.describe() for t in all_techniques()]
    if a.json:
        _print_json(ts)
    else:
        from .techniques.base import FAMILY_HELP
        family = None
        for t in ts:
            if t["family"] != family:
                family = t["family"]
                print(f"\n== {family}: {FAMILY_HELP.get(family, '')}")
            print(f"{t['name']}: {t['summary']}")
            for f in t["fields"]:
                labels = f.get("labels") or {}
                shown = [labels.get(str(c), c) for c in f["choices"] or []]  # 0 -> per-channel, as recipes say it
                rng = f"choices {shown}" if f["choices"] else (
                    f"{f['min']}..{f['max']}" if f["min"] is not None else f["type"])
                print(f"    {f['name']} = {f['default']!r:12} {rng} {f['unit']}  {f['help']}")
    return 0


def cmd_eval(a) -> int:
    from .jobs.spec import JobSpec
    spec = JobSpec(model=a.model, recipe=_recipe(a), eval=_eval_settings(a), reuse=not a.fresh)
    _run_and_say(spec, a, lambda r: (
        f"{r['label']}: ppl {r['ppl']:.3f} ({r['tokens_scored']} tokens, context {r['context']}), "
        f"{r['size_bytes'] / 1e6:.1f} MB on disk ({r['theoretical_bytes'] / 1e6:.1f} MB theoretical), "
        f"decode {r['decode_tokens_per_s']:.1f} tok/s, prefill {r['prefill_tokens_per_s']:.0f} tok/s"))
    return 0


def _run_and_say(spec, a, line) -> dict:
    """Runs the job; prints its result as one JSON object (--json) or as `line(result)`."""
    r = _run(spec, a.quiet)
    r["job_id"] = spec.job_id
    if a.json:
        _print_json(r)
    else:
        print(line(r))
    return r


def cmd_export(a) -> int:
    from .jobs.spec import JobSpec
    if a.format != "onnx":
        raise SqueezeError(f"unknown export format {a.format!r}; only onnx is supported")
    out = Path(a.out).expanduser().resolve()
    spec = JobSpec(model=a.model, recipe=_recipe(a), eval=_eval_settings(a), kind="export", reuse=not a.fresh,
                   export={"out": str(out), "quantize": a.quantize, "opset": a.opset, "graph": a.graph})
    r = _run_and_say(spec, a, lambda r: (
        f"exported to {r['path']}: {r['size_bytes'] / 1e6:.1f} MB, ppl onnx {r['ppl_onnx']:.3f} "
        f"vs torch {r['ppl_torch']:.3f}, decode {r['decode_tokens_per_s_onnx']:.1f} tok/s "
        f"(torch {r['decode_tokens_per_s_torch']:.1f}, {r['roofline_fraction'] * 100:.0f} % of the memory bound)"
        + ("" if r.get("ok", True) else f"\nVERIFICATION FAILED: {r.get('failure')}")))
    return 0 if r.get("ok", True) else 1


def cmd_generate(a) -> int:
    """Greedy continuation, exactly as the export's parity check and generate.py compute it."""
    from .evaluate import greedy
    from .variant import MANIFEST, load_variant
    if a.new_tokens < 1:
        raise SqueezeError(f"--new-tokens must be at least 1; got {a.new_tokens}")
    if not a.prompt.strip():
        raise SqueezeError("the prompt is empty: give the text to continue")
    if Path(a.model, "model.onnx").is_file() and not Path(a.model, MANIFEST).is_file():
        raise SqueezeError(f"{a.model} is an ONNX export: run its own generate.py "
                           f"(python {Path(a.model) / 'generate.py'} \"{a.prompt}\")")
    if Path(a.model, MANIFEST).is_file():
        model, tok = load_variant(Path(a.model))
    else:
        from .models import load
        model, tok, _ = load(a.model)
    ids = tok(a.prompt)["input_ids"]
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and len(ids) + a.new_tokens > positions:
        raise SqueezeError(f"the prompt's {len(ids)} tokens and --new-tokens {a.new_tokens} exceed the model's "
                           f"{positions} positions: generate fewer tokens")
    new = greedy(model, ids, a.new_tokens, eos=tok.eos_token_id)
    text = a.prompt + tok.decode(new, skip_special_tokens=True)  # as tokenizers does in generate.py
    if a.json:
        _print_json({"prompt": a.prompt, "prompt_ids": ids, "new_ids": new, "text": text})
    else:
        print(text)
    return 0


def _ledger():
    """The ledger, with the rows of squeeze / app processes that died mid-job marked interrupted."""
    from .ledger import Ledger
    ledger = Ledger()
    ledger.mark_interrupted(known_pid_only=True)
    return ledger


def cmd_runs(a) -> int:
    from .results import what_ran
    ledger = _ledger()
    asked = list(dict.fromkeys(a.delete or []))  # each once, in order
    unknown = [i for i in asked if ledger.get(i) is None]
    if unknown:  # checked before anything is deleted
        raise SqueezeError(f"no run {unknown[0]} in the ledger; `squeeze runs` lists them")
    if a.clear_failed:
        asked += [r["id"] for r in ledger.rows(a.model) if r["status"] in ("failed", "cancelled", "interrupted")]
    rows_gone, freed = set(), []
    for run_id in asked:
        if run_id in rows_gone or ledger.get(run_id) is None:  # already gone with its parent
            continue
        ids, folders = ledger.forget(run_id)
        rows_gone.update(ids)
        freed += folders
    if asked or a.clear_failed:
        print(f"deleted {len(rows_gone)} run(s) and {len(freed)} saved folder(s)", file=sys.stderr)
    rows = ledger.rows(a.model)
    if a.json:
        _print_json(rows)
    elif not rows:  # a silent empty answer reads like a broken command
        print("no runs" + (f" of {a.model}" if a.model else "") + " in the ledger"
              + ("; `squeeze runs` lists every model's" if a.model else ""), file=sys.stderr)
    else:
        for r in rows:
            res = r["result"] or {}
            label, status = r["label"], r["status"]
            if r["kind"] == "export":  # what was exported, and whether it passed its verification
                q = ((r.get("settings") or {}).get("export") or {}).get("quantize") or "fp32"
                label = f"ONNX {q} of {label}"
                if status == "done" and not res.get("ok", True):
                    status = "failed check"
            elif r["kind"] != "eval":
                label = f"{r['kind']}: {label}"
            ppl = (f"ppl {res['ppl']:.2f}" if "ppl" in res else f"ppl {res['ppl_onnx']:.2f} (onnx)"
                   if "ppl_onnx" in res else "")
            why = r["error"] or (res.get("failure") if status == "failed check" else None)
            print(f"{r['id']}  {status:12} {r['model']:24} {label[:50]:50} {ppl}" + (f"  {why}" if why else ""))
            for line in what_ran(res):
                print(f"{'':14}{line}")
    return 0


def cmd_report(a) -> int:
    from .report import write
    runs = _ledger().rows(a.model)
    if not runs:
        raise SqueezeError("the ledger has no runs" + (f" of {a.model}" if a.model else "") + "; run something first")
    out = write(Path(a.out).expanduser(), runs)
    if out.suffix.lower() == ".json":
        print(f"wrote {out} ({len(runs)} ledger rows)")
    else:  # the table: one row per evaluated run and export (sensitivity scans, side by sides are not in it)
        from .results import table_rows
        print(f"wrote {out} ({len(table_rows(runs))} runs and exports)")
    return 0


def cmd_sensitivity(a) -> int:
    """The sensitivity map (Δ ppl per layer × module), and with --budget-mb the mixed-precision
    recipe it implies; --save / --load keep a scan so budgets can be tried without re-scanning."""
    from .jobs.spec import JobSpec
    from .paths import check_target, write_atomic
    from .recipe import SUFFIXES
    from .sensitivity import check_setting
    # every option checked before a scan of minutes starts, not after it
    if a.setting is None:
        a.setting = 4.0 if a.technique == "rtn" else 0.5
    if a.budget_mb is not None and not a.budget_mb > 0:
        raise SqueezeError(f"--budget-mb must be a size in MB above 0; got {a.budget_mb:g}")
    if a.budget_mb is not None and not a.load:
        from .mixed_precision import check_scan_for_budget
        check_scan_for_budget(a.technique, a.setting)
    if a.recipe_out:
        if a.budget_mb is None:
            raise SqueezeError("--recipe-out writes the mixed-precision recipe of a size budget: add --budget-mb")
        if Path(a.recipe_out).suffix.lower() not in SUFFIXES:
            raise SqueezeError(f"--recipe-out must end in .yaml, .yml or .json: {a.recipe_out}")
        check_target(a.recipe_out, "--recipe-out")
    if a.load:
        try:
            scan = json.loads(Path(a.load).expanduser().read_text(encoding="utf-8"))
            missing = [k for k in SCAN_KEYS if k not in scan]
            if missing:
                raise ValueError(f"it lacks {', '.join(missing)}")
        except (OSError, ValueError, TypeError) as e:
            raise SqueezeError(f"cannot read the scan {a.load}: {e}; write one with --save") from None
    else:
        check_setting(a.technique, a.setting, a.group_size)
        if a.save:
            check_target(a.save, "--save")
        spec = JobSpec(model=a.model, kind="sensitivity", eval=_eval_settings(a),
                       compare={"technique": a.technique, "setting": a.setting, "group_size": a.group_size,
                                "precision": a.precision})
        scan = _run(spec, a.quiet)
        if a.save:
            write_atomic(Path(a.save).expanduser(), json.dumps(scan))
    out = {"scan": scan}
    if a.budget_mb is not None:
        from .mixed_precision import allocate, summary
        from .recipe import from_data
        alloc = allocate(scan, a.budget_mb)
        out["mixed_precision"] = alloc
        if a.recipe_out:
            from_data(alloc["recipe"]).save(a.recipe_out)
    if a.json:
        _print_json(out)
        return 0
    cells = sorted(((v, i, m) for i, row in enumerate(scan["delta_pct"]) for m, v in zip(scan["modules"], row)
                    if v is not None), reverse=True)
    print(f"{scan['technique']} {scan['setting']:g} on one Linear at a time: base ppl {scan['base_ppl']:.3f}, "
          f"{scan['tokens']:,} tokens; most sensitive:")
    for v, i, m in cells[:10]:
        print(f"  layer {i:3} {m:10} {v:+8.2f} %")
    if "mixed_precision" in out:
        print(summary(out["mixed_precision"]))
        print(f"recipe written to {a.recipe_out}" if a.recipe_out else
              "(--recipe-out FILE.yaml writes the recipe; `squeeze eval MODEL --recipe FILE.yaml` runs it)")
    return 0


SCAN_KEYS = ("technique", "setting", "base_ppl", "tokens", "layers", "modules", "delta_pct")


def cmd_recipe(a) -> int:
    from . import recipe as rc
    if a.list:
        shipped = rc.bundled()
        if a.json:
            _print_json([{"id": b.id, "name": b.name, "description": b.description, **b.recipe.to_dict()}
                         for b in shipped])
        else:
            for b in shipped:
                print(b.id)
                for para in (f"{b.name}: {b.recipe.label()}", b.description):
                    print(textwrap.fill(para, width=100, initial_indent="    ", subsequent_indent="      "))
            print("(use one as `--recipe bundled:NAME`; `squeeze recipe bundled:NAME --json` prints its steps)")
        return 0
    if not a.file:
        raise SqueezeError("give a recipe file (or bundled:NAME) to check, or --list for the bundled recipes")
    r = rc.load(a.file)
    r.check_files()
    if a.json:
        _print_json(r.to_dict())
    else:
        print(f"ok: {r.label()}")
    return 0


MODEL_HELP = "bundled:smollm2-135m, a model folder, a .gguf file or a cached hub id"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="squeeze", description="Compress language models and measure the result.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"squeeze-studio {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def fresh(sp):
        sp.add_argument("--fresh", action="store_true",
                        help="apply every step of the recipe, even where a saved variant already holds its first steps")

    from .evaluate import EvalSettings
    d = EvalSettings()

    def common(sp, evals=True, recipe=True, decode=True):
        """--json and -q everywhere; for jobs (evals) the evaluation settings, with their defaults."""
        sp.add_argument("--json", action="store_true", help="one JSON object on stdout")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr (jobs print some)")
        if not evals:
            return
        if recipe:
            sp.add_argument("--recipe", help="recipe file (.yaml, .yml or .json), or a shipped one: bundled:NAME "
                                             "(`squeeze recipe --list`)")
        sp.add_argument("--text", help="evaluation text file (default: the shipped WikiText-2 slice)")
        sp.add_argument("--max-tokens", type=int, help=f"tokens of the text to score (default {d.max_tokens})")
        sp.add_argument("--context", type=int, help=f"window length in tokens (default {d.context})")
        if decode:
            sp.add_argument("--prompt-tokens", type=int,
                            help=f"decode benchmark: prompt length (default {d.prompt_tokens})")
            sp.add_argument("--new-tokens", type=int, help=f"decode benchmark: tokens generated (default {d.new_tokens})")
            sp.add_argument("--repeats", type=int, help=f"decode benchmark: timed repeats, median (default {d.repeats})")

    sp = sub.add_parser("models", help="known models")
    common(sp, evals=False)
    sp.set_defaults(fn=cmd_models)
    sp = sub.add_parser("techniques", help="techniques and their settings")
    common(sp, evals=False)
    sp.set_defaults(fn=cmd_techniques)
    sp = sub.add_parser("eval", help="apply a recipe (optional) and measure")
    sp.add_argument("model", help=MODEL_HELP)
    common(sp)
    fresh(sp)
    sp.set_defaults(fn=cmd_eval)
    sp = sub.add_parser("export", help="export to ONNX and verify the exported file")
    sp.add_argument("model", help=MODEL_HELP)
    sp.add_argument("--format", default="onnx", help="onnx (the only format)")
    sp.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="int8: 8-bit weights (MatMulNBits); int4: 4-bit from the variant's gptq / awq / rtn codes; "
                         "default: fp32, lossless")
    sp.add_argument("--opset", type=int, choices=[14, 17, 18], default=None,
                    help="ONNX opset (default: 17 for the fused graph, optimum-onnx's choice for the portable one)")
    sp.add_argument("--graph", choices=["fused", "portable"], default="fused",
                    help="fused: onnxruntime's fused attention and norm ops, fastest in onnxruntime (Llama "
                         "models; others fall back to portable); portable: standard ONNX ops only (optimum-onnx), "
                         "for other runtimes")
    sp.add_argument("--out", required=True, help="output folder: new, empty, or an earlier export's (replaced; its ledger row is marked so)")
    common(sp)
    fresh(sp)
    sp.set_defaults(fn=cmd_export)
    sp = sub.add_parser("generate", help="greedy continuation of a prompt (a model id or a saved variant folder)")
    sp.add_argument("model", help=MODEL_HELP + ", or a saved variant folder")
    sp.add_argument("prompt", help="the text to continue")
    sp.add_argument("--new-tokens", type=int, default=40, help="tokens to generate (default 40)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_generate)
    sp = sub.add_parser("report", help="the study as one offline HTML file (or the ledger as .csv / .json)")
    sp.add_argument("out", help="study.html, runs.csv or runs.json")
    sp.add_argument("--model", help="only this model's runs")
    sp.set_defaults(fn=cmd_report)
    sp = sub.add_parser("runs", help="the ledger's rows")
    sp.add_argument("--model", help="only this model's runs")
    sp.add_argument("--delete", nargs="+", metavar="ID", help="delete these runs, their exports and their saved "
                                                            "variants (files in the workspace only)")
    sp.add_argument("--clear-failed", action="store_true",
                    help="delete every failed, cancelled or interrupted run (of --model, if given); an export that "
                         "failed its check is a finished run: --delete it")
    common(sp, evals=False)
    sp.set_defaults(fn=cmd_runs)
    sp = sub.add_parser("sensitivity", help="Δ perplexity per layer × module; --budget-mb: a mixed-precision recipe")
    sp.add_argument("model", help=MODEL_HELP + " (ignored with --load)")
    sp.add_argument("--technique", choices=["rtn", "magnitude_prune"], default="rtn")
    sp.add_argument("--setting", type=float, default=None,
                    help="bits (rtn; default 4) or sparsity (magnitude_prune; default 0.5)")
    sp.add_argument("--group-size", type=int, default=64, help="rtn's group size (default 64)")
    sp.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="matmuls of the scan: bf16 is ~2x faster where the CPU has it (auto), fp32 exact")
    sp.add_argument("--save", metavar="SCAN.json", help="keep the scan")
    sp.add_argument("--load", metavar="SCAN.json", help="use a kept scan instead of scanning")
    sp.add_argument("--budget-mb", type=float, help="size budget: which Linears keep 8 bits (rtn scans)")
    sp.add_argument("--recipe-out", metavar="FILE.yaml", help="write the mixed-precision recipe (needs --budget-mb)")
    common(sp, recipe=False, decode=False)
    sp.set_defaults(fn=cmd_sensitivity)
    sp = sub.add_parser("recipe", help="check a recipe file; --list: the bundled recipes")
    sp.add_argument("file", nargs="?", help="a recipe file, or bundled:NAME")
    sp.add_argument("--list", action="store_true", help="the recipes shipped with the app, with what each measured")
    common(sp, evals=False)
    sp.set_defaults(fn=cmd_recipe)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, a closed session) unwinds like Ctrl-C, so the job's ledger row is closed."""


def _terminated(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    import signal
    p = parser()
    if not (sys.argv[1:] if argv is None else argv):  # bare `squeeze`: what it can do, not "arguments required"
        p.print_help()
        return 0
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    as_json = bool(getattr(a, "json", False))
    model = getattr(a, "model", None)
    if model and not model.startswith("bundled:") and Path(model).expanduser().exists():
        # one spelling per folder: `./tiny/` and its absolute path are one model (runs, reuse, baselines)
        a.model = str(Path(model).expanduser().resolve())
    try:
        return a.fn(a)
    except SqueezeError as e:
        return _fail(str(e), as_json=as_json)
    except Terminated:
        return _fail("terminated", 143, as_json)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, as_json)
    except BrokenPipeError:  # `squeeze techniques | head`: the reader left; no traceback for that
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
