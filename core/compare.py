"""Side-by-side generation: two models continue one prompt greedily; every token the second
(the variant) wrote is scored by how far its next-token distribution is from the first's (the
reference) at the same position, KL(reference || variant), both run on the variant's own text.
Also the top-5 next tokens of both at every position, and where the two outputs first differ.
"""
from __future__ import annotations

TOP_K = 5


def _distributions(model, ids: list[int]):
    """log-probabilities (T, V) of the next token after each prefix of `ids`."""
    import torch
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _top(tok, logp_row, k: int = TOP_K) -> list[dict]:
    p, i = logp_row.exp().topk(k)
    return [{"token": tok.decode([int(t)]), "id": int(t), "p": float(q)} for q, t in zip(p, i)]


def side_by_side(reference, variant, tok, prompt: str, new_tokens: int = 32, check_cancel=None) -> dict:
    """-> {prompt, reference: {ids, text, tokens}, variant: {ids, text, tokens, kl}, first_diff,
    top: [{reference: top-5, variant: top-5}] per variant token, mean_kl}. `tokens` are the decoded
    pieces of the generated ids, for colouring one by one."""
    from .evaluate import greedy

    ids = tok(prompt)["input_ids"]
    eos = tok.eos_token_id
    out = {"prompt": prompt}
    for name, m in (("reference", reference), ("variant", variant)):
        if check_cancel:
            check_cancel()
        new = greedy(m, ids, new_tokens, eos=eos)
        out[name] = {"ids": new, "text": tok.decode(new, skip_special_tokens=True),
                     "tokens": [tok.decode([t]) for t in new]}
    seq = ids + out["variant"]["ids"]
    n = len(out["variant"]["ids"])
    lp_ref = _distributions(reference, seq)[len(ids) - 1:len(ids) - 1 + n]    # (n, V): before each variant token
    lp_var = _distributions(variant, seq)[len(ids) - 1:len(ids) - 1 + n]
    kl = (lp_ref.exp() * (lp_ref - lp_var)).sum(-1).clamp(min=0)              # (n,)
    out["variant"]["kl"] = [float(x) for x in kl]
    out["top"] = [{"reference": _top(tok, lp_ref[i]), "variant": _top(tok, lp_var[i])} for i in range(n)]
    a, b = out["reference"]["ids"], out["variant"]["ids"]
    out["first_diff"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                             None if len(a) == len(b) else min(len(a), len(b)))
    out["mean_kl"] = float(kl.mean()) if n else 0.0
    return out
