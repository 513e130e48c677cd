"""The technique protocol: a frozen config dataclass whose fields carry slider metadata,
plus one `apply(model, config, ctx)` function.

The metadata declared with `knob(...)` is the single source for the GUI's sliders, the CLI's
`techniques --json`, recipe validation and the docs.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import RecipeError

FAMILIES = ("quantization", "pruning", "distillation", "architecture", "kv_cache")
# One line per family, shown above its techniques in the GUI and by `squeeze techniques`.
FAMILY_HELP = {
    "architecture": "Change the model's shape or its inference loop: fewer layers, heads or channels, "
                    "factored weights, exiting early. These make a model faster, not only smaller.",
    "distillation": "Train the changed model to imitate the original one on text (never the evaluation text).",
    "pruning": "Set weights to zero (any, or N of every M): smaller when stored sparse; calibrated "
               "methods choose which and correct the rest.",
    "kv_cache": "Shrink what the model remembers while generating (the key/value cache): quantize it "
                "or keep a window.",
    "quantization": "Store weights (and maybe activations) in fewer bits; calibrated methods keep the "
                    "error where the activations are small.",
}


@dataclass(frozen=True)
class Knob:
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple | None = None
    labels: dict | None = None  # choice -> shown text, e.g. {0: "per-channel"}
    unit: str = ""
    help: str = ""
    scale: str = "linear"  # "log": a slider spaced by ratio (a learning rate over three decades)


def knob(default, *, min=None, max=None, step=None, choices=None, labels=None, unit="", help="", scale="linear"):
    """A config field with slider metadata."""
    if not help:
        raise ValueError("every knob needs a one-line help text")
    if scale not in ("linear", "log") or (scale == "log" and not (min and min > 0)):
        raise ValueError("scale is 'linear' or 'log' (log needs a minimum above 0)")
    k = Knob(min, max, step, tuple(choices) if choices is not None else None, labels, unit, help, scale)
    return field(default=default, metadata={"knob": k})


@dataclass(frozen=True)
class Technique:
    name: str
    config: type
    apply: Callable
    family: str
    summary: str
    # What it leaves behind, for composition checks before a job starts:
    packs: bool = False        # weights end up packed low-bit: later steps that need float weights refuse
    needs_float: bool = True   # needs dense float weights to work on

    def fields(self) -> list[dict]:
        hints = typing.get_type_hints(self.config)
        out = []
        for f in dataclasses.fields(self.config):
            k: Knob = f.metadata["knob"]
            t = hints[f.name]
            out.append({
                "name": f.name,
                "type": _type_name(t),
                "default": f.default,
                "min": k.min,
                "max": k.max,
                "step": k.step,
                "choices": list(k.choices) if k.choices is not None else None,
                "labels": {str(a): b for a, b in k.labels.items()} if k.labels else None,
                "unit": k.unit,
                "help": k.help,
                "scale": k.scale,
            })
        return out

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "summary": self.summary,
                "packs": self.packs, "fields": self.fields()}

    def make(self, values: dict[str, Any] | None = None, step: int | None = None):
        """Validated config from plain values; raises RecipeError naming the field."""
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(self.config)}
        for key in values:
            if key not in known:
                from .registry import nearest
                hint = nearest(str(key), list(known))
                msg = f"{self.name} has no field {key!r}"
                msg += f"; did you mean {hint!r}?" if hint else f"; its fields are {', '.join(known)}"
                raise RecipeError(msg, field=str(key), step=step)
        hints = typing.get_type_hints(self.config)
        clean = {}
        for name, f in known.items():
            if name in values:
                clean[name] = _check(self.name, name, values[name], hints[name], f.metadata["knob"], step)
        cfg = self.config(**clean)
        if hasattr(cfg, "check"):  # rules between fields (moefy: top_k <= experts), at load, not at apply
            try:
                cfg.check()
            except RecipeError as e:
                raise RecipeError(str(e), field=e.field, step=step) from None
        return cfg


def _type_name(t) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(t, str(t))


def _allowed(k: Knob, t) -> str:
    if k.choices is not None:
        shown = [k.labels.get(c, c) if k.labels else c for c in k.choices]
        return "one of " + ", ".join(str(c) for c in shown)
    if t is bool:
        return "true or false"
    what = "an integer" if t is int else "a number"
    return f"{what} from {k.min} to {k.max}"


def _check(tech: str, name: str, v, t, k: Knob, step):
    def bad(why):
        return RecipeError(f"{tech}.{name} {why}; allowed: {_allowed(k, t)}", field=name, step=step)

    if k.labels and isinstance(v, str):  # a choice may be given by its label: "per-channel"
        for c, label in k.labels.items():
            if v == label:
                v = c
    if t is bool:
        if not isinstance(v, bool):
            raise bad(f"must be true or false, got {v!r}")
    elif t is int:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(f"must be an integer, got {v!r}")
        if isinstance(v, float):
            if not math.isfinite(v) or v != int(v):
                raise bad(f"must be an integer, got {v!r}")
            v = int(v)
    elif t is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(f"must be a number, got {v!r}")
        try:
            v = float(v)
        except OverflowError:
            raise bad(f"is out of range, got {v!r}") from None
        if not math.isfinite(v):
            raise bad(f"must be a finite number, got {v!r}")
    elif t is str:
        if not isinstance(v, str):
            raise bad(f"must be text, got {v!r}")
    if k.choices is not None:
        if v not in k.choices or isinstance(v, bool) != any(isinstance(c, bool) for c in k.choices):
            raise bad(f"is {v!r}")
    else:
        if k.min is not None and v < k.min:
            raise bad(f"is {v!r}, below the minimum")
        if k.max is not None and v > k.max:
            raise bad(f"is {v!r}, above the maximum")
    return v


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


class StepContext:
    """What an apply function gets besides the model and its config.

    packed:   weight name -> QTensor, filled by quantizers; saved packed, loaded back dequantized
    runtime:  transforms re-applied when the saved variant is loaded (e.g. "dynamic_int8")
    progress: progress(fraction, note, eta_s=None) within this step
    tokenizer: the model's tokenizer (calibration text is tokenized with it)
    state_key: identifies the model as this step receives it (base model + the steps before);
               calibration statistics are cached under it
    """

    def __init__(self, progress: Callable[[float, str, float | None], None] | None = None,
                 cancelled: Callable[[], bool] | None = None,
                 log: Callable[[str], None] | None = None,
                 tokenizer=None, state_key: str = ""):
        self.packed: dict = {}
        self.runtime: list[str] = []
        self.tokenizer = tokenizer
        self.state_key = state_key
        self._progress = progress or (lambda f, note="", eta_s=None: None)
        self._cancelled = cancelled or (lambda: False)
        self.log = log or (lambda text: None)

    def progress(self, fraction: float, note: str = "", eta_s: float | None = None) -> None:
        """Calls the `progress(fraction, note, eta_s)` given at construction. `eta_s`: a step that times
        itself (a training loop) says how long it has left, else None."""
        self._progress(max(0.0, min(1.0, fraction)), note, eta_s)

    @contextmanager
    def part(self, start: float, end: float):
        """Within it, progress 0..1 of a sub-task shows as start..end of this step."""
        outer = self._progress
        self._progress = lambda f, note="", eta_s=None: outer(start + (end - start) * f, note, eta_s)
        try:
            yield self
        finally:
            self._progress = outer

    def check_cancel(self) -> None:
        if self._cancelled():
            from ..errors import Cancelled
            raise Cancelled()


def target_linears(model, include_lm_head: bool = False) -> list[tuple[str, "torch.nn.Linear"]]:
    """The decoder's Linear layers (q/k/v/o/gate/up/down), optionally the LM head."""
    import torch
    out = [(n, m) for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]
    if include_lm_head:
        head = model.get_output_embeddings()
        if isinstance(head, torch.nn.Linear):
            out.append(("lm_head", head))
    return out
