"""Ledger rows -> results-table rows: each run next to the baseline of the same model and eval
settings (Δ% perplexity, × smaller, × faster decode), the trade-off points and their Pareto
front. Plain Python, no Qt: the GUI's table and plot and any CLI report share it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

MB = 1_000_000
EMPTY_RECIPE = {"steps": []}


def is_baseline(run: dict) -> bool:
    return run.get("kind") == "eval" and not (run.get("recipe") or EMPTY_RECIPE).get("steps")


def baselines(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """(model, eval_key) -> the latest finished no-recipe eval (the rule of Ledger.baseline)."""
    out: dict[tuple[str, str], dict] = {}
    for r in sorted(runs, key=lambda r: r.get("created") or 0):
        if is_baseline(r) and r.get("status") == "done" and r.get("result"):
            out[(r["model"], r.get("eval_key"))] = r
    return out


def _ratio(a, b) -> float | None:
    return a / b if a and b else None


def table_rows(runs: list[dict]) -> list[dict]:
    """One flat row per eval run, each followed by the rows of its ONNX exports (their numbers are
    those verified in onnxruntime, compared with the same baseline)."""
    base = baselines(runs)
    out = []
    exports: dict[str, list[dict]] = {}
    # `squeeze export` records no parent: its row goes under the latest finished run of the same model and
    # recipe (the variant it rebuilt or reused), or stands alone when there is none
    same = {_recipe_key(r): r["id"] for r in sorted(runs, key=lambda r: r.get("created") or 0)
            if r.get("kind") == "eval" and r.get("status") == "done"}
    alone = []
    for r in runs:
        if r.get("kind") == "export":
            parent = r.get("parent_id") or same.get(_recipe_key(r))
            if parent:
                exports.setdefault(parent, []).append(r)
            else:
                alone.append(r)
    for r in runs:
        if r.get("kind") != "eval":
            continue
        res = r.get("result") or {}
        b = base.get((r["model"], r.get("eval_key")))
        bres = (b or {}).get("result") or {}
        ppl, bppl = res.get("ppl"), bres.get("ppl")
        settings = (r.get("settings") or {}).get("eval") or {}
        out.append({
            "id": r["id"],
            "model": r["model"],
            "status": r["status"],
            "label": r.get("label") or "baseline",
            "error": r.get("error"),
            "recipe": r.get("recipe") or EMPTY_RECIPE,
            "ran": what_ran(res),
            "eval": settings,
            "eval_key": r.get("eval_key"),
            "baseline": is_baseline(r),
            "variant_dir": res.get("variant_dir"),
            "ppl": ppl,
            "delta_ppl_pct": (ppl / bppl - 1) * 100 if ppl is not None and bppl else None,
            "size_bytes": res.get("size_bytes"),
            "x_smaller": _ratio(bres.get("size_bytes"), res.get("size_bytes")),
            "theoretical_bytes": res.get("theoretical_bytes"),
            "params": res.get("params"),
            "nonzero_params": res.get("nonzero_params"),
            "prefill_tokens_per_s": res.get("prefill_tokens_per_s"),
            "decode_tokens_per_s": res.get("decode_tokens_per_s"),
            "x_faster": _ratio(res.get("decode_tokens_per_s"), bres.get("decode_tokens_per_s")),
            "kv_bytes_per_token": res.get("kv_bytes_per_token"),
            "roofline_fraction": res.get("roofline_fraction"),
            "peak_rss_bytes": res.get("peak_rss_bytes"),
            "seconds": res.get("seconds"),
            "created": r.get("created"),
        })
        out += [export_row(x, out[-1], bres) for x in exports.get(r["id"], [])]
    for x in alone:
        settings = (x.get("settings") or {}).get("eval") or {}
        recipe = x.get("recipe") or EMPTY_RECIPE
        parent = {"id": None, "model": x["model"], "recipe": recipe, "eval": settings, "eval_key": x.get("eval_key"),
                  "variant_dir": None, "label": x.get("label") or "baseline", "params": None, "nonzero_params": None}
        bres = (base.get((x["model"], x.get("eval_key"))) or {}).get("result") or {}
        out.append(export_row(x, parent, bres))
    return out


def _recipe_key(r: dict) -> tuple:
    return r.get("model"), json.dumps(r.get("recipe") or EMPTY_RECIPE, sort_keys=True)


def what_ran(result: dict) -> list[str]:
    """Where a step did other than its settings say (a time budget planned fewer steps), one line each; the
    label shows the settings."""
    out = []
    for info in result.get("steps") or []:
        asked, ran = info.get("steps_asked"), info.get("steps")
        if info.get("technique") == "distill" and asked and ran != asked:
            out.append(f"distill ran {ran} of its {asked} steps: its {info.get('minutes', 0):g}-minute budget "
                       "held no more")
    return out


def export_row(x: dict, parent: dict, bres: dict) -> dict:
    """The row of an ONNX export under its parent run: the numbers verified in onnxruntime."""
    res = x.get("result") or {}
    q = (((x.get("settings") or {}).get("export") or {}).get("quantize")) or "fp32"
    ppl, bppl = res.get("ppl_onnx"), bres.get("ppl")
    failure = res.get("failure") if res and not res.get("ok", True) else None
    return {
        **{k: parent[k] for k in ("model", "recipe", "eval", "eval_key", "variant_dir")},
        "id": x["id"], "parent_id": parent["id"], "export": True, "baseline": False,
        "status": x["status"] if x["status"] != "done" or not failure else "failed check",
        "label": f"↳ ONNX {q} · {parent['label']}",
        "error": x.get("error") or failure,
        "ppl": ppl,
        "delta_ppl_pct": (ppl / bppl - 1) * 100 if ppl is not None and bppl else None,
        "size_bytes": res.get("size_bytes"),
        "x_smaller": _ratio(bres.get("size_bytes"), res.get("size_bytes")),
        "theoretical_bytes": None, "params": parent.get("params"), "nonzero_params": parent.get("nonzero_params"),
        "prefill_tokens_per_s": res.get("prefill_tokens_per_s_onnx"),
        "decode_tokens_per_s": res.get("decode_tokens_per_s_onnx"),
        "x_faster": _ratio(res.get("decode_tokens_per_s_onnx"), bres.get("decode_tokens_per_s")),
        "kv_bytes_per_token": None,
        "roofline_fraction": res.get("roofline_fraction"),
        "peak_rss_bytes": res.get("peak_rss_bytes"),
        "seconds": res.get("seconds"),
        "created": x.get("created"),
    }


# ---------------------------------------------------------------- formatting

def fmt_mb(b) -> str:
    return "" if b is None else f"{b / MB:,.1f}" if b >= 10 * MB else f"{b / MB:,.2f}"


def fmt_x(x) -> str:
    return "" if x is None else f"{x:.2f}×"


def fmt_pct(p) -> str:
    return "" if p is None else f"{round(p, 1) + 0.0:+.1f} %"  # + 0.0: -0.04 shows +0.0, not -0.0


def fmt_count(n) -> str:
    if n is None:
        return ""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return str(n)


def fmt_duration(seconds) -> str:
    """e.g. "40 s", "2 min 05 s"."""
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s < 1:
        return "under a second"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def fmt_rate(r) -> str:
    return "" if r is None else f"{r:,.0f}" if r >= 100 else f"{r:.1f}"


def fmt_ppl(p) -> str:
    return "" if p is None else f"{p:,.1f}" if p >= 100 else f"{p:.3f}"


def fmt_eval(s: dict) -> str:
    """Short eval settings, e.g. "eval.txt 4096 tok × 512"."""
    if not s:
        return ""
    name = (s.get("text") or "shipped").replace("\\", "/").rsplit("/", 1)[-1]
    return f"{name} {s.get('max_tokens')} tok × {s.get('context')}"


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: Callable[[object], str]
    tip: str
    numeric: bool = True


COLUMNS = [
    Column("status", "status", str, "done, running, failed, cancelled, interrupted, or replaced (an export "
           "overwritten by a later one into the same folder)", False),
    Column("label", "recipe", str, "the recipe's steps", False),
    Column("ppl", "ppl", fmt_ppl, "perplexity on the eval text (lower is better)"),
    Column("delta_ppl_pct", "Δ ppl", fmt_pct, "perplexity change vs the baseline (same model and eval settings)"),
    Column("size_bytes", "size MB", fmt_mb, "size on disk of the saved variant"),
    Column("x_smaller", "× smaller", fmt_x, "baseline size / this size"),
    Column("theoretical_bytes", "theory MB", fmt_mb, "bits × non-zero params / 8 + scale overhead"),
    Column("nonzero_params", "non-zero", fmt_count, "parameters that are not zero"),
    Column("prefill_tokens_per_s", "prefill tok/s", fmt_rate, "prompt tokens per second"),
    Column("decode_tokens_per_s", "decode tok/s", fmt_rate, "generated tokens per second (greedy, KV cache)"),
    Column("x_faster", "× faster", fmt_x, "decode speed / baseline decode speed"),
    Column("kv_bytes_per_token", "KV kB/tok", lambda b: "" if b is None else f"{b / 1000:,.1f}",
           "bytes the KV cache holds per token seen (at the end of an eval window), in kB"),
    Column("roofline_fraction", "% of bound", lambda f: "" if f is None else f"{f * 100:.0f} %",
           "decode speed as a share of what this machine's memory bandwidth allows for the weight bytes "
           "read per token (the roofline)"),
    Column("peak_rss_bytes", "peak RAM MB", fmt_mb, "peak resident memory of the worker"),
    Column("eval", "eval", fmt_eval, "eval text, tokens × context", False),
    Column("error", "note", lambda e: e or "", "why a run failed, was cancelled or interrupted", False),
]


def cell(row: dict, col: Column) -> str:
    return col.fmt(row.get(col.key))


# ---------------------------------------------------------------- trade-off

AXES = {
    # x axis -> (row key, scale to shown unit, lower x is better)
    "size": ("size_bytes", 1 / MB, True),
    "decode": ("decode_tokens_per_s", 1.0, False),
}


def pareto_front(points: list[tuple[object, float, float]], x_lower_better: bool = True) -> list:
    """Ids of the points no other point beats on both x and y (y = perplexity, lower is better),
    ordered by ascending x."""
    order = sorted(points, key=lambda p: (p[1] if x_lower_better else -p[1], p[2]))
    front, best_y = [], float("inf")
    for pid, x, y in order:
        if y < best_y:
            front.append((pid, x))
            best_y = y
    return [pid for pid, _ in sorted(front, key=lambda p: p[1])]


def trade_off(rows: list[dict], axis: str = "size", eval_key: str | None = None) -> tuple[list[dict], list]:
    """Points {id, x, y, baseline, export, label} of the finished runs (of `eval_key` if given) and the
    ids of the Pareto front. ONNX exports are points too (what a user deploys) but stay off the front:
    their speed is onnxruntime's, not torch's, so on the decode axis they would crowd every torch
    variant off it."""
    key, scale, lower = AXES[axis]
    pts = [{"id": r["id"], "x": r[key] * scale, "y": r["ppl"], "baseline": r["baseline"],
            "export": bool(r.get("export")), "label": r["label"]}
           for r in rows
           if r["status"] == "done" and r.get("ppl") is not None and r.get(key) is not None
           and (eval_key is None or r["eval_key"] == eval_key)]
    return pts, pareto_front([(p["id"], p["x"], p["y"]) for p in pts if not p["export"]], lower)


# ---------------------------------------------------------------- recommendation

TARGETS = {
    # kind -> (what the user bounds, row key, unit, bound is a maximum)
    "size": ("size on disk", "size_bytes", "MB", True),
    "decode": ("decode speed", "decode_tokens_per_s", "tok/s", False),
    "delta_ppl": ("perplexity change", "delta_ppl_pct", "%", True),
}


def recommend(rows: list[dict], kind: str, bound: float, eval_key: str | None = None) -> tuple[dict | None, str]:
    """The row to ship for a target: of the finished rows that meet `bound` (size ≤ MB, decode ≥
    tok/s, or Δppl ≤ %), the best on the other axis — lowest perplexity for a size or speed
    target, smallest file for a quality target. -> (row or None, one sentence saying why)."""
    what, key, unit, is_max = TARGETS[kind]
    scale = MB if kind == "size" else 1.0
    done = [r for r in rows if r["status"] == "done" and r.get("ppl") is not None and r.get(key) is not None
            and (eval_key is None or r.get("eval_key") == eval_key)]
    ok = [r for r in done if (r[key] / scale <= bound if is_max else r[key] / scale >= bound)]
    if not ok:
        closest = (min if is_max else max)(done, key=lambda r: r[key], default=None)
        near = f"; the closest is {closest['label']} at {closest[key] / scale:,.1f} {unit}" if closest else ""
        return None, f"No run has {what} {'≤' if is_max else '≥'} {bound:g} {unit}{near}."
    if kind == "delta_ppl":
        best = min(ok, key=lambda r: (r["size_bytes"] or float("inf"), r["ppl"]))
        why = (f"{best['label']} is the smallest file ({fmt_mb(best['size_bytes'])} MB) of the {len(ok)} runs "
               f"within {bound:g} % perplexity of the baseline ({fmt_pct(best['delta_ppl_pct'])}).")
    else:
        best = min(ok, key=lambda r: (r["ppl"], r["size_bytes"] or 0))
        why = (f"{best['label']} has the lowest perplexity ({fmt_ppl(best['ppl'])}, {fmt_pct(best['delta_ppl_pct'])}) "
               f"of the {len(ok)} runs with {what} {'≤' if is_max else '≥'} {bound:g} {unit} "
               f"({best[key] / scale:,.1f} {unit}).")
    return best, why
