"""A recipe: an ordered list of technique steps. Loads from / saves to YAML or JSON.

    steps:
      - technique: rtn
        bits: 4
        group_size: 64

Every problem is a RecipeError naming the step and field, never another exception.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .techniques import get
from .techniques.base import Technique


@dataclass(frozen=True)
class Step:
    technique: Technique
    config: Any

    @property
    def name(self) -> str:
        return self.technique.name

    def to_dict(self) -> dict:
        return {"technique": self.name, **dataclasses.asdict(self.config)}

    def label(self) -> str:
        parts = [self.name]
        for f in self.technique.fields():
            v = getattr(self.config, f["name"])
            if isinstance(v, bool):
                if v:
                    parts.append(f["name"])
            elif v == "":  # an unset text field (no exclusions, the shipped calibration text)
                continue
            elif isinstance(v, str) and v.count(",") >= 2:  # a long list of Linears: its count, not the names
                parts.append(f"{f['name']}={v.count(',') + 1}")
            else:
                shown = (f["labels"] or {}).get(str(v), v)
                parts.append(f"{f['name']}={shown}")
        return " ".join(parts)


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...] = ()

    def to_dict(self) -> dict:
        return {"steps": [s.to_dict() for s in self.steps]}

    def label(self) -> str:
        return " → ".join(s.label() for s in self.steps) or "baseline"

    def to_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        from .paths import write_atomic
        if str(path).startswith(BUNDLED):  # load() reads that name as a shipped recipe, never as this file
            raise RecipeError(f"{BUNDLED}… names the app's shipped recipes; save under another name")
        path = Path(path).expanduser()
        if path.suffix.lower() not in SUFFIXES:  # what load() would refuse
            raise RecipeError(f"a recipe file must end in .yaml, .yml or .json: {path.name}")
        write_atomic(path, self.to_json() if path.suffix.lower() == ".json" else self.to_yaml())

    def check_files(self) -> None:
        """Files the steps name (calibration texts) exist: a typo fails here, not after the model loaded."""
        for i, s in enumerate(self.steps):
            for f in s.technique.fields():
                v = getattr(s.config, f["name"])
                if f.get("unit") == "file" and v and not Path(v).expanduser().is_file():
                    raise RecipeError(f"{s.name}.{f['name']}: no file at {v}; give a text file, or leave it empty "
                                      "for the shipped text", field=f["name"], step=i)

    @property
    def packs(self) -> bool:
        return any(s.technique.packs for s in self.steps)


SUFFIXES = (".yaml", ".yml", ".json")  # the recipe files load() reads and save() writes


def from_data(data: Any) -> Recipe:
    """From parsed YAML/JSON: {"steps": [...]} or a bare list of steps (or null: no steps)."""
    if data is None:
        return Recipe()
    if isinstance(data, dict):
        extra = [k for k in data if k not in ("steps", "name", "description")]
        if extra:
            raise RecipeError(f"unknown top-level key {extra[0]!r}; a recipe has 'steps'", field=str(extra[0]))
        data = data.get("steps") or []
    if not isinstance(data, list):
        raise RecipeError("a recipe is a mapping with a 'steps' list", field="steps")
    steps = []
    for i, raw in enumerate(data):
        if not isinstance(raw, dict):
            raise RecipeError(f"each step is a mapping with a 'technique' key, got {_short(raw)}",
                              field="technique", step=i)
        if "technique" not in raw:
            raise RecipeError("missing 'technique'", field="technique", step=i)
        values = {k: v for k, v in raw.items() if k != "technique"}
        tech = get(raw["technique"], step=i)
        steps.append(Step(tech, tech.make(values, step=i)))
    check_order(steps)
    return Recipe(tuple(steps))


RESHAPING = ("structured_prune", "low_rank")  # change the model's shapes: before any packing step
RUNTIME = ("early_exit", "kv_quant", "kv_window")  # fitted to / wrap the weights as they are: after distill

# The order in which a set of techniques works, for a recipe built by ticking boxes (the GUI's panel):
# shapes first (structured_prune before low_rank, whose factors it cannot prune), then the MoE split, sparse
# masks, distill healing what came before (it keeps every zero), quantization packing the healed weights, and
# last what wraps the inference loop. Every pair check_order allows in some order is allowed in this one.
WORKING_ORDER = (("structured_prune",), ("low_rank",), ("moefy",), ("magnitude_prune", "sparsegpt", "wanda"),
                 ("distill",), ("awq", "dynamic_int8", "gptq", "rtn", "smoothquant", "weight_sharing"),
                 ("early_exit",), ("kv_quant", "kv_window"))


def working_rank(name: str) -> int:
    """Where a technique goes in WORKING_ORDER (a technique not listed goes last)."""
    return next((i for i, names in enumerate(WORKING_ORDER) if name in names), len(WORKING_ORDER))


def in_working_order(steps: list[dict]) -> list[dict]:
    """Step mappings sorted into WORKING_ORDER (stable: steps of one rank keep their order)."""
    return sorted(steps, key=lambda s: working_rank(s.get("technique", "")))


def check_order(steps: list[Step]) -> None:
    """Composition rules, checked before a job starts."""
    packed_by = factored_by = runtime_by = None
    for i, s in enumerate(steps):
        if packed_by is not None and s.name in RESHAPING:
            raise RecipeError(
                f"technique {s.name} cannot follow {packed_by}: {s.name} changes the model's shapes and "
                f"{packed_by} has packed the weights of the old shapes. Shape changes come first, quantization "
                f"last: put {s.name} before {packed_by} (e.g. structured_prune → low_rank → gptq).",
                field="technique", step=i)
        if factored_by is not None and s.name in RESHAPING:
            raise RecipeError(
                f"technique {s.name} cannot follow {factored_by}: {factored_by} has replaced the Linears by two "
                f"factors. Put structured_prune before low_rank, and keep one low_rank step.",
                field="technique", step=i)
        if s.name == "low_rank":
            factored_by = s.name
        if s.name == "distill" and packed_by is not None:
            raise RecipeError(
                f"technique distill cannot follow {packed_by}: distill trains float weights and {packed_by} has "
                f"packed them low-bit. Working order: shape changes, then distill, then quantization "
                f"(e.g. structured_prune → distill → {packed_by}).", field="technique", step=i)
        if s.name == "distill" and runtime_by is not None:
            raise RecipeError(
                f"technique distill cannot follow {runtime_by}: {runtime_by} was set up for the weights before "
                f"training changes them. Put {runtime_by} after distill (e.g. structured_prune → distill → "
                f"{runtime_by}).", field="technique", step=i)
        if s.name in RUNTIME:
            runtime_by = s.name
        if packed_by is not None and s.technique.packs:
            raise RecipeError(f"technique {s.name} cannot follow {packed_by}: the weights are already packed "
                              f"by {packed_by}; keep one quantization step, last", field="technique", step=i)
        if packed_by is not None and s.technique.needs_float:
            raise RecipeError(
                f"technique {s.name} cannot follow {packed_by}: {packed_by} leaves packed low-bit weights "
                f"and {s.name} needs float weights. Put {s.name} before {packed_by}.",
                field="technique", step=i)
        if s.technique.packs:
            packed_by = s.name


def loads(text: str, fmt: str = "yaml") -> Recipe:
    try:
        if fmt == "json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except RecipeError:
        raise
    except Exception as e:  # YAMLError, ValueError (bad dates), RecursionError ...
        mark = getattr(e, "problem_mark", None)
        if mark is not None:  # PyYAML's first line ("while parsing a flow sequence") says neither where nor what
            what = " ".join(x for x in (getattr(e, "problem", None), f"({e.context})" if getattr(e, "context", None)
                                        else None) if x)
            raise RecipeError(f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"not valid {fmt.upper()}: {first}") from None
    return from_data(data)


def load(path: str | Path) -> Recipe:
    """A recipe file, or a shipped recipe by its id (bundled:gptq-4bit)."""
    if str(path).startswith(BUNDLED):
        return bundled_recipe(str(path)).recipe
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise RecipeError(f"recipe file must end in .yaml, .yml or .json: {path.name}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from None
    return loads(text, "json" if suffix == ".json" else "yaml")


BUNDLED = "bundled:"  # the recipes shipped in resources/recipes, by file name: bundled:gptq-4bit


@dataclass(frozen=True)
class Bundled:
    id: str  # bundled:<file stem>
    name: str  # a title for menus
    description: str  # what it does and what it measured on the bundled model
    recipe: Recipe


def bundled() -> list[Bundled]:
    """The shipped recipes (resources/recipes/*.yaml: name, description, steps), by family of their first
    step, then by name."""
    import yaml

    from .paths import resources_dir
    from .techniques.base import FAMILIES
    out = []
    for f in (resources_dir() / "recipes").glob("*.yaml"):
        try:  # a broken shipped file names itself (a packaging fault, caught by the tests)
            # libyaml's loader where present: the window reads these at start, ~8x faster than pure-Python
            data = yaml.load(f.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            if not isinstance(data, dict):
                raise RecipeError("not a mapping with name, description and steps")
            recipe = from_data(data)
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecipeError) as e:
            raise RecipeError(f"the bundled recipe {f.name} cannot be read: {e}") from None
        out.append(Bundled(BUNDLED + f.stem, str(data.get("name") or f.stem),
                           " ".join(str(data.get("description") or "").split()), recipe))
    return sorted(out, key=lambda b: (FAMILIES.index(b.recipe.steps[0].technique.family) if b.recipe.steps else -1,
                                      b.name.lower()))


def bundled_recipe(ident: str) -> Bundled:
    """One shipped recipe by id; an unknown id names the nearest."""
    from .techniques.registry import nearest
    known = {b.id: b for b in bundled()}
    if ident in known:
        return known[ident]
    near = nearest(ident, list(known))
    raise RecipeError(f"no bundled recipe {ident!r}" + (f"; did you mean {near!r}?" if near else "") +
                      " (`squeeze recipe --list` lists them)")


def of(*steps: tuple[str, dict] | str) -> Recipe:
    """Recipe from (name, values) pairs, for code and tests: of(("rtn", {"bits": 4}))."""
    data = [{"technique": s} if isinstance(s, str) else {"technique": s[0], **s[1]} for s in steps]
    return from_data(data)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) < 40 else r[:37] + "..."
