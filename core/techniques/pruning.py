"""Weight pruning."""
from __future__ import annotations

from dataclasses import dataclass

from .base import StepContext, knob, target_linears
from .registry import technique


@dataclass(frozen=True)
class MagnitudePrune:
    """Unstructured magnitude pruning: zero the smallest weights of the Linear layers."""

    sparsity: float = knob(0.5, min=0.0, max=0.95, step=0.05, unit="fraction",
                           help="Fraction of each Linear weight set to zero (0.5 = half).")
    scope: str = knob("per-layer", choices=("per-layer", "global"),
                      help="Per-layer: every layer loses the same fraction; global: one threshold for all layers.")
    exclude: str = knob("", help="Linears left unpruned, comma-separated name endings (e.g. layers.0.mlp.down_proj); "
                                 "the sensitivity map fills this in when a cell is clicked.")


@technique(MagnitudePrune, name="magnitude_prune", family="pruning")
def magnitude_prune(model, cfg: MagnitudePrune, ctx: StepContext) -> dict:
    import torch

    from .quantization import excluded
    skip = excluded(cfg.exclude, model)
    layers = [(n, m) for n, m in target_linears(model) if not n.endswith(skip)]
    if cfg.sparsity <= 0:
        return {"layers": len(layers), "sparsity": 0.0}
    threshold = None
    if cfg.scope == "global":
        # kthvalue over all |w| at once would need a copy of every weight; sample-free exact
        # threshold via a histogram is overkill here: the decoder weights of the models we
        # target fit in memory once more.
        allw = torch.cat([m.weight.detach().abs().reshape(-1) for _, m in layers])
        k = int(cfg.sparsity * allw.numel())
        threshold = allw.kthvalue(max(k, 1)).values.item() if k > 0 else -1.0
        del allw
    zeroed = total = 0
    for i, (name, lin) in enumerate(layers):
        ctx.check_cancel()
        w = lin.weight.data
        if threshold is None:
            k = int(cfg.sparsity * w.numel())
            if k == 0:
                continue
            t = w.abs().reshape(-1).kthvalue(k).values
            mask = w.abs() > t
        else:
            mask = w.abs() > threshold
        w.mul_(mask)
        zeroed += int((~mask).sum())
        total += w.numel()
        ctx.progress((i + 1) / len(layers), name)
    return {"layers": len(layers), "sparsity": zeroed / max(total, 1), "scope": cfg.scope}
