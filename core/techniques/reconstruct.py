"""Block-wise reconstruction after pruning: each decoder layer's kept weights tuned so that its output matches
the unpruned model's hidden state at that depth (the mask held: pruned weights stay zero).

One-shot pruning fits each Linear to its own inputs; the errors then add up through 30 layers. Here each layer,
in order, is trained on the pruned model's own inputs to reach the *unpruned* model's stream, so a layer also
corrects what the layers before it lost. Written here because no kept library does it for a Hugging Face
decoder layer (llm-compressor and SparseML ship one-shot SparseGPT / Wanda only)."""
from __future__ import annotations

import time

import torch

from ..calibration import _out, decoder_layers, layer0_inputs
from .base import StepContext
from .distillation import relative_mse  # each token's error relative to its size, as distill's hidden-state term


def reconstruct(student, teacher, ids: torch.Tensor, ctx: StepContext, epochs: int, lr: float = 3e-4,
                batch: int = 4) -> dict:
    """Trains every decoder layer of `student` in turn (Adam, `epochs` passes over the (n, seq) windows `ids`);
    only its Linear weights move and their zeros stay zero. Returns the mean relative error before and after."""
    hidden, kwargs = layer0_inputs(student, ids, batch)  # the embedding is shared: the teacher's are the same
    xs, xt = list(hidden), [h.clone() for h in hidden]
    s_layers, t_layers = decoder_layers(student), decoder_layers(teacher)
    before = after = 0.0
    t0 = time.monotonic()
    for i, (ls, lt) in enumerate(zip(s_layers, t_layers)):
        ctx.check_cancel()
        with torch.no_grad():
            xt = [_out(lt(x, **kw)) for x, kw in zip(xt, kwargs)]  # the target: the unpruned stream, one deeper
        weights = [m.weight for m in ls.modules() if isinstance(m, torch.nn.Linear)]
        masks = [w != 0 for w in weights]
        trainable = [p.requires_grad for p in ls.parameters()]
        for p in ls.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        opt = torch.optim.Adam(weights, lr=lr)
        gen = torch.Generator().manual_seed(i)
        try:
            with torch.no_grad():
                first = sum(float(relative_mse(_out(ls(x, **kw)), t)) for x, kw, t in zip(xs, kwargs, xt)) / len(xs)
            for _ in range(epochs):
                for b in torch.randperm(len(xs), generator=gen).tolist():
                    with torch.enable_grad():
                        loss = relative_mse(_out(ls(xs[b], **kwargs[b])), xt[b])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    with torch.no_grad():  # a pruned weight's gradient, so its Adam moments and step, stay 0
                        for w, m in zip(weights, masks):
                            w.grad.mul_(m)
                    opt.step()
                ctx.check_cancel()
        finally:
            for p, was in zip(ls.parameters(), trainable):
                p.requires_grad_(was)
        with torch.no_grad():
            xs = [_out(ls(x, **kw)) for x, kw in zip(xs, kwargs)]
            last = sum(float(relative_mse(y, t)) for y, t in zip(xs, xt)) / len(xs)
        before, after = before + first, after + last
        left = (time.monotonic() - t0) / (i + 1) * (len(s_layers) - i - 1)  # every layer costs the same
        ctx.progress((i + 1) / len(s_layers), f"reconstruction: layer {i + 1}/{len(s_layers)}", left)
    n = max(1, len(s_layers))
    return {"reconstruction_error": [round(before / n, 5), round(after / n, 5)]}
