"""The study as one self-contained HTML file (opens offline in any browser: no scripts, no
external links; the plots are inline SVG): the results table, the trade-off plots with their
Pareto fronts, each run's recipe as YAML, machine and versions. Also the ledger as CSV / JSON.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import time
from pathlib import Path

from .paths import write_atomic
from .results import COLUMNS, cell, fmt_eval, table_rows, trade_off

W, H, PAD = 640, 380, 56


EXPORT_COLOUR = "#8e24aa"


def _svg_plot(points: list[dict], front: list, x_label: str, log_x: bool = False) -> str:
    """Scatter of perplexity (log scale when it spans > 10x) against x; the front as a line."""
    if not points:
        return "<p><i>no finished runs to plot</i></p>"
    ys = [p["y"] for p in points]
    log_y = max(ys) / max(min(ys), 1e-9) > 10
    fy = (lambda v: math.log10(max(v, 1e-9))) if log_y else (lambda v: v)
    fx = (lambda v: math.log10(max(v, 1e-9))) if log_x else (lambda v: v)
    xs = [fx(p["x"]) for p in points]
    yv = [fy(v) for v in ys]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(yv), max(yv)
    x0, x1 = (x0 - 1, x1 + 1) if x1 == x0 else (x0 - 0.05 * (x1 - x0), x1 + 0.05 * (x1 - x0))
    y0, y1 = (y0 - 1, y1 + 1) if y1 == y0 else (y0 - 0.08 * (y1 - y0), y1 + 0.08 * (y1 - y0))
    sx = lambda v: PAD + (v - x0) / (x1 - x0) * (W - 2 * PAD)  # noqa: E731
    sy = lambda v: H - PAD - (v - y0) / (y1 - y0) * (H - 2 * PAD)  # noqa: E731
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' viewBox='0 0 {W} {H}' "
           "font-family='sans-serif' font-size='11'>",
           f"<rect x='{PAD}' y='{PAD}' width='{W - 2 * PAD}' height='{H - 2 * PAD}' fill='white' stroke='#999'/>"]
    for k in range(5):  # ticks
        vx, vy = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        tx = 10 ** vx if log_x else vx
        ty = 10 ** vy if log_y else vy
        out.append(f"<text x='{sx(vx):.1f}' y='{H - PAD + 16}' text-anchor='middle'>{tx:,.3g}</text>")
        out.append(f"<text x='{PAD - 6}' y='{sy(vy) + 4:.1f}' text-anchor='end'>{ty:,.3g}</text>")
    out.append(f"<text x='{W / 2}' y='{H - 12}' text-anchor='middle'>{html.escape(x_label)}</text>")
    out.append(f"<text x='14' y='{H / 2}' transform='rotate(-90 14 {H / 2})' text-anchor='middle'>"
               f"perplexity{' (log)' if log_y else ''} — lower is better</text>")
    by_id = {p["id"]: p for p in points}
    line = [by_id[i] for i in front if i in by_id]
    if len(line) > 1:
        pts = " ".join(f"{sx(fx(p['x'])):.1f},{sy(fy(p['y'])):.1f}" for p in line)
        out.append(f"<polyline points='{pts}' fill='none' stroke='#2e7d32' stroke-width='1.5'/>")
    for p in points:
        cx, cy = sx(fx(p["x"])), sy(fy(p["y"]))
        colour = "#ef6c00" if p["baseline"] else EXPORT_COLOUR if p.get("export") else "#1565c0"
        out.append(f"<circle cx='{cx:.1f}' cy='{cy:.1f}' r='5' fill='{colour}'><title>{html.escape(p['label'])}: "
                   f"ppl {p['y']:.4g}</title></circle>")
        out.append(f"<text x='{cx + 7:.1f}' y='{cy - 6:.1f}' fill='#555'>{html.escape(p['label'][:40])}</text>")
    out.append("</svg>")
    return "".join(out)


def _yaml(recipe: dict) -> str:
    import yaml
    return yaml.safe_dump(recipe, sort_keys=False).strip()


def html_report(runs: list[dict], title: str = "Squeeze Studio study") -> str:
    rows = table_rows(runs)
    head = "".join(f"<th title='{html.escape(c.tip)}'>{html.escape(c.header)}</th>" for c in COLUMNS)
    body = "".join("<tr" + (" class='base'" if r["baseline"] else "") + ">"
                   + "".join(f"<td{' class=num' if c.numeric else ''}>{html.escape(cell(r, c))}</td>" for c in COLUMNS)
                   + "</tr>" for r in rows)
    plots = []
    for axis, label, log_x in (("size", "size on disk (MB) — smaller is better", False),
                               ("decode", "decode tok/s — faster is better", False)):
        pts, front = trade_off(rows, axis)
        plots.append(f"<figure>{_svg_plot(pts, front, label, log_x)}<figcaption>perplexity vs {axis}; "
                     "orange: baseline, blue: runs, purple: ONNX exports (onnxruntime's speed; off the front), "
                     "green: Pareto front of the runs</figcaption></figure>")
    recipes = "".join(
        f"<h3>{html.escape(r['label'])}</h3><p class=meta>{html.escape(r['model'])} · {html.escape(fmt_eval(r['eval']))}"
        f" · {r['status']}</p><pre>{html.escape(_yaml(r['recipe']))}</pre>"
        for r in rows if not r["baseline"] and not r.get("export"))
    from .about import machine, versions
    info = {**{f"machine: {k}": v for k, v in machine().items()}, **{f"version: {k}": v for k, v in versions().items()}}
    info_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in info.items())
    models = sorted({r["model"] for r in rows})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; }}
th {{ background: #f0f0f0; }} td.num {{ text-align: right; }} tr.base {{ font-weight: bold; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }} figcaption {{ font-size: 12px; color: #555; }}
pre {{ background: #f7f7f7; padding: 0.6em; }} .meta {{ color: #666; font-size: 12px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class=meta>Written {time.strftime('%Y-%m-%d %H:%M')} · models: {html.escape(', '.join(models))} · {len(rows)} rows
(runs, and ONNX exports under their runs, marked ↳)</p>
<h2>Results</h2>
<table><tr>{head}</tr>{body}</table>
<h2>Trade-offs</h2>
{''.join(plots)}
<h2>Recipes</h2>
{recipes or '<p><i>no recipes yet</i></p>'}
<h2>Machine and versions</h2>
<table>{info_rows}</table>
</body></html>
"""


def ledger_csv(runs: list[dict]) -> str:
    """One line per results-table row, the table's own columns plus ids and the recipe as JSON."""
    rows = table_rows(runs)
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = ["id", "parent_id", "model", "label", "status"] + [c.key for c in COLUMNS if c.numeric]
    w.writerow(keys + ["recipe", "eval"])
    for r in rows:
        w.writerow([r.get(k) for k in keys] + [json.dumps(r["recipe"]), json.dumps(r["eval"])])
    return buf.getvalue()


def write(path: Path, runs: list[dict]) -> Path:
    """By extension: .html (the report), .csv or .json (the ledger)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in (".html", ".htm"):
        text = html_report(runs)
    elif ext == ".csv":
        text = ledger_csv(runs)
    elif ext == ".json":
        text = json.dumps(runs, indent=2, default=str)
    else:
        from .errors import SqueezeError
        raise SqueezeError(f"cannot write a report as {path.name}: use .html, .csv or .json")
    write_atomic(path, text)
    return path

