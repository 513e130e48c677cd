"""Mixed precision from a sensitivity scan: for a size budget, which Linears keep 8 bits while the
rest take the scanned bit width. Each Linear's Δ perplexity at the low width (from the scan) is
what upgrading it buys back, its extra bytes what it costs; Linears are upgraded in order of
Δ per extra byte while the budget allows (a greedy knapsack — exact enough when each item is small
against the budget, as 210 Linears against one model are). Pure Python: the GUI calls it live as
the budget slider moves."""
from __future__ import annotations

import math

from .errors import SqueezeError
from .sensitivity import module_path

HIGH_BITS = 8


def linear_bytes(shape, bits: int, group_size: int) -> float:
    """Packed bytes of one (out, in) weight: codes + one fp16 scale per group (symmetric)."""
    out, inp = shape
    groups = 1 if group_size == 0 else math.ceil(inp / group_size)
    return out * inp * bits / 8 + out * groups * 2


def _cells(scan: dict):
    for i, (row, shapes) in enumerate(zip(scan["delta_pct"], scan["shapes"])):
        for k, (delta, shape) in enumerate(zip(row, shapes)):
            if shape is not None and delta is not None:
                yield i, scan["modules"][k], float(delta), shape


def size_range(scan: dict) -> tuple[float, float]:
    """(bytes with every scanned Linear at the scanned bits, bytes with all of them at 8 bits)."""
    bits, g = int(scan["setting"]), int(scan.get("group_size", 64))
    cells = list(_cells(scan))
    low = scan["other_bytes"] + sum(linear_bytes(s, bits, g) for *_, s in cells)
    high = scan["other_bytes"] + sum(linear_bytes(s, HIGH_BITS, g) for *_, s in cells)
    return low, high


def check_scan_for_budget(technique: str, setting: float) -> None:
    """What allocate() needs of a scan, said before a scan of minutes runs."""
    if technique != "rtn":
        raise SqueezeError("mixed precision needs a sensitivity scan of rtn (bits); this one scanned "
                           f"{technique}: scan again with rtn")
    if int(setting) >= HIGH_BITS:
        raise SqueezeError(f"the scan used {int(setting)} bits: scan at fewer bits (e.g. 4) to allocate 8 bits where "
                           "it matters")


def allocate(scan: dict, budget_mb: float) -> dict:
    """-> {bits, group_size, upgrade (module paths at 8 bits), size_mb, low_mb, high_mb,
    est_delta_pct (sum of the scan's Δ left at the low width: a first-order estimate), recipe}."""
    check_scan_for_budget(scan.get("technique"), scan["setting"])
    bits, g = int(scan["setting"]), int(scan.get("group_size", 64))
    low, high = size_range(scan)
    budget = budget_mb * 1e6
    if budget < low:
        raise SqueezeError(f"{budget_mb:,.4g} MB is below the smallest this model reaches with every Linear at "
                           f"{bits} bits ({low / 1e6:,.4g} MB): raise the budget, or scan at fewer bits")
    items = []
    for i, m, delta, shape in _cells(scan):
        extra = linear_bytes(shape, HIGH_BITS, g) - linear_bytes(shape, bits, g)
        items.append((delta / extra, i, m, delta, extra))
    items.sort(reverse=True)
    size, upgrade, left, harmless = low, [], 0.0, 0
    for gain, i, m, delta, extra in items:
        if delta > 0 and size + extra <= budget:
            upgrade.append(module_path(i, m))
            size += extra
        else:
            left += max(delta, 0.0)
            harmless += delta <= 0
    steps = [{"technique": "rtn", "bits": bits, "group_size": g, "symmetric": True,
              "upgrade_8bit": ", ".join(upgrade)}]
    return {"bits": bits, "group_size": g, "upgrade": upgrade, "linears": len(items), "harmless": harmless,
            "size_mb": size / 1e6,
            "low_mb": low / 1e6, "high_mb": high / 1e6, "est_delta_pct": left, "recipe": {"steps": steps}}


def _mb(v: float) -> str:
    return f"{v:,.1f} MB" if v >= 50 else f"{v:.3f} MB"


def summary(a: dict) -> str:
    return (f"{len(a['upgrade'])} of {a['linears']} Linears at {HIGH_BITS} bits, the rest at {a['bits']}: "
            f"≈ {_mb(a['size_mb'])} (all at {a['bits']} bits: {_mb(a['low_mb'])}, all at {HIGH_BITS}: "
            f"{_mb(a['high_mb'])}); the scan predicts ≈ +{a['est_delta_pct']:.2f} % perplexity"
            + (f"; {a['harmless']} Linears stay at {a['bits']} bits whatever the budget: the scan measured no "
               "perplexity cost for them" if a.get("harmless") else ""))
