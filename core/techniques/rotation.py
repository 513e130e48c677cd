"""Residual-stream rotation (QuaRot / SpinQuant style) before weight quantization.

The decoder's residual stream is turned by a fixed orthogonal Q (a DCT after random sign
flips): x' = Q^T x. RMSNorm commutes with it once its weight is folded into the Linears that
read it, so the float model computes exactly the same function, but the massive activations
of a few channels are spread over all of them: the Linears' inputs lose their outlier channels
and grouped grids fit better.

    readers (q/k/v, gate/up):  W' = W diag(gamma) Q        writers (o, down):  W' = Q^T W
    embedding output:          e' = e Q (row vectors)      final norm input:   x = x' Q^T

The embedding stays as it is (it is tied to the LM head); the two small products at either
end are a runtime transform re-attached on load from the manifest entry "rotate:dct:<seed>:<n>".
"""
from __future__ import annotations


def matrix(n: int, seed: int):
    """(n, n) orthogonal float32: Q = diag(signs) C^T with C the orthonormal DCT-II."""
    import math

    import torch
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    C = torch.cos(math.pi * (j + 0.5) * k / n) * math.sqrt(2.0 / n)
    C[0] /= math.sqrt(2.0)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return (signs[:, None] * C.T).float()


def rotate_model(model, seed: int = 0) -> str:
    """Rotates a Llama-style model in place (function unchanged). -> the runtime entry."""
    import torch

    from ..calibration import decoder_layers
    inner = model.model
    n = model.config.hidden_size
    Q = matrix(n, seed)
    with torch.no_grad():
        for layer in decoder_layers(model):
            a, m = layer.self_attn, layer.mlp
            for norm, readers in ((layer.input_layernorm, (a.q_proj, a.k_proj, a.v_proj)),
                                  (layer.post_attention_layernorm, (m.gate_proj, m.up_proj))):
                for lin in readers:
                    lin.weight.copy_((lin.weight * norm.weight[None, :]) @ Q)
                norm.weight.fill_(1.0)
            for lin in (a.o_proj, m.down_proj):
                lin.weight.copy_(Q.T @ lin.weight)
                if lin.bias is not None:
                    lin.bias.copy_(Q.T @ lin.bias)
    entry = f"rotate:dct:{seed}:{n}"
    attach(inner, Q)
    return entry


def attach(inner, Q) -> None:
    """The two runtime products: embedding output -> rotated; final norm input -> unrotated."""
    inner.embed_tokens.register_forward_hook(lambda _m, _a, out: out @ Q)
    inner.norm.register_forward_pre_hook(lambda _m, args: (args[0] @ Q.T, *args[1:]))


def attach_from(model, entry: str) -> None:
    """Re-attaches the runtime products of a saved rotated variant."""
    _, _kind, seed, n = entry.split(":")
    attach(model.model, matrix(int(n), int(seed)))
