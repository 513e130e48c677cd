"""Techniques by name. Duplicates fail loudly; a typo gets the nearest name."""
from __future__ import annotations

import difflib

from ..errors import RecipeError
from .base import FAMILIES, Technique

_REGISTRY: dict[str, Technique] = {}


def technique(config: type, *, name: str, family: str, packs: bool = False, needs_float: bool = True):
    """Decorator for the apply function: registers `name` -> (config, apply)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"technique {name!r} is registered twice "
                             f"({_REGISTRY[name].apply.__module__} and {fn.__module__})")
        summary = (config.__doc__ or "").strip().splitlines()[0]
        _REGISTRY[name] = Technique(name, config, fn, family, summary, packs, needs_float)
        return fn

    return deco


def nearest(name: str, names: list[str]) -> str | None:
    """The closest of `names`, compared without a "bundled:" prefix (shared, it made "bundled:nope" look like
    "bundled:kv-int8")."""
    def bare(s: str) -> str:
        return s.removeprefix("bundled:")
    by = {bare(n): n for n in names}
    hit = difflib.get_close_matches(bare(name), list(by), n=1, cutoff=0.5)
    return by[hit[0]] if hit else None


def _load():
    # Importing the family modules registers their techniques.
    from . import (architecture, awq, early_exit, gptq, kv_cache, moefy, pruning, quantization,  # noqa: F401
                   smoothquant, sparse, weight_sharing)
    from . import distillation  # noqa: F401


def get(name: str, step: int | None = None) -> Technique:
    _load()
    if not isinstance(name, str) or name not in _REGISTRY:
        hint = nearest(str(name), list(_REGISTRY))
        msg = f"unknown technique {name!r}"
        msg += f"; did you mean {hint!r}?" if hint else f"; known: {', '.join(sorted(_REGISTRY))}"
        raise RecipeError(msg, field="technique", step=step)
    return _REGISTRY[name]


def all_techniques() -> list[Technique]:
    _load()
    return sorted(_REGISTRY.values(), key=lambda t: (FAMILIES.index(t.family), t.name))
