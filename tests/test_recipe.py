"""Recipes: round-trips, clear errors, and a property test that throws thousands of generated
recipes at the loader: each loads, or raises the project's RecipeError naming the field."""
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import recipe as rc
from core.errors import RecipeError
from core.techniques import all_techniques

NAMES = [t.name for t in all_techniques()]
FIELDS = sorted({f["name"] for t in all_techniques() for f in t.fields()})


def test_every_technique_default_round_trips_through_yaml_and_json():
    for t in all_techniques():
        r = rc.of(t.name)
        assert rc.loads(r.to_yaml(), "yaml") == r
        assert rc.loads(r.to_json(), "json") == r


def test_every_field_has_complete_slider_metadata():
    for t in all_techniques():
        assert t.summary
        for f in t.fields():
            assert f["help"] and f["type"] in ("int", "float", "bool", "str"), (t.name, f)
            if f["type"] in ("int", "float") and not f["choices"]:
                assert None not in (f["min"], f["max"], f["step"]), (t.name, f)
                assert f["min"] <= f["default"] <= f["max"]
                pos = (f["default"] - f["min"]) / f["step"]  # the GUI slider must be able to show it
                assert abs(pos - round(pos)) < 1e-6, (t.name, f["name"], "default is off the slider's grid")
            if f["choices"]:
                assert f["default"] in f["choices"]


def test_documented_yaml_example_loads(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("steps:\n  - technique: rtn\n    bits: 4\n    group_size: 64\n")
    r = rc.load(p)
    assert r.steps[0].config.bits == 4 and r.steps[0].config.group_size == 64
    q = tmp_path / "r.json"
    r.save(q)
    assert rc.load(q) == r and json.loads(q.read_text())["steps"][0]["technique"] == "rtn"


@pytest.mark.parametrize("text, field, words", [
    ("steps: [{technique: rtm}]", "technique", "did you mean 'rtn'"),
    ("steps: [{technique: rtn, bits: 12}]", "bits", "from 2 to 8"),
    ("steps: [{technique: rtn, bits: four}]", "bits", "must be an integer"),
    ("steps: [{technique: rtn, group_size: 48}]", "group_size", "per-channel"),
    ("steps: [{technique: magnitude_prune, sparsity: 0.99}]", "sparsity", "0.95"),
    ("steps: [{technique: rtn, bitz: 4}]", "bitz", "did you mean 'bits'"),
    ("steps: [{technique: rtn}, {technique: magnitude_prune}]", "technique", "before rtn"),
])
def test_bad_recipes_name_the_field_and_the_allowed_values(text, field, words):
    with pytest.raises(RecipeError) as e:
        rc.loads(text)
    assert e.value.field == field and words in str(e.value)


def test_missing_and_misnamed_files(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        rc.load(tmp_path / "nope.yaml")
    (tmp_path / "r.txt").write_text("steps: []")
    with pytest.raises(RecipeError, match=r"\.yaml, \.yml or \.json"):
        rc.load(tmp_path / "r.txt")


# -- property tests -----------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                    st.dictionaries(st.text(max_size=6), c, max_size=3)),
                      max_leaves=6)
names = st.one_of(st.sampled_from(NAMES), st.text(max_size=12), st.sampled_from(["rtm", "RTN", "prune", ""]))
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=10))
field_values = st.one_of(scalars, values, st.integers(0, 300), st.floats(0, 1), st.sampled_from(
    ["per-channel", "global", "per-layer", 64, 128, 0.5, True]))
steps = st.one_of(
    st.fixed_dictionaries({"technique": names}, optional={}).flatmap(
        lambda base: st.dictionaries(keys, field_values, max_size=4).map(lambda d: {**d, **base})),
    values)
recipes = st.one_of(
    st.fixed_dictionaries({"steps": st.lists(steps, max_size=4)}),
    st.lists(steps, max_size=3),
    values,
    st.dictionaries(st.text(max_size=8), values, max_size=3))


def _check_loads_or_names_field(load):
    try:
        r = load()
    except RecipeError as e:
        if e.field is not None:
            assert e.field in str(e) or repr(e.field) in str(e), (e.field, str(e))
        return None
    assert isinstance(r, rc.Recipe)
    assert rc.loads(r.to_yaml()) == r and rc.loads(r.to_json(), "json") == r
    return r


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes)
def test_generated_recipes_load_or_fail_with_a_named_field(data):
    _check_loads_or_names_field(lambda: rc.from_data(data))
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        return
    _check_loads_or_names_field(lambda: rc.loads(text, "yaml"))


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80), st.sampled_from(["yaml", "json"]))
def test_malformed_text_is_a_recipe_error(text, fmt):
    _check_loads_or_names_field(lambda: rc.loads(text, fmt))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(NAMES), st.data()), max_size=3))
def test_valid_recipes_round_trip(pairs):
    data = []
    for name, d in pairs:
        t = next(t for t in all_techniques() if t.name == name)
        step = {"technique": name}
        for f in t.fields():
            if f["choices"]:
                step[f["name"]] = d.draw(st.sampled_from(f["choices"]))
            elif f["type"] == "bool":
                step[f["name"]] = d.draw(st.booleans())
            elif f["type"] == "int":
                step[f["name"]] = d.draw(st.integers(f["min"], f["max"]))
            elif f["type"] == "float":
                step[f["name"]] = d.draw(st.floats(f["min"], f["max"]))
        data.append(step)
    try:
        r = rc.from_data(data)
    except RecipeError as e:  # only composition rules and rules between fields may refuse a well-typed recipe
        assert "cannot follow" in str(e) or (e.field == "top_k" and "is more than moefy.experts" in str(e))
        return
    assert rc.loads(r.to_yaml()) == r and rc.loads(r.to_json(), "json") == r


def test_a_yaml_typo_is_reported_with_its_line_and_column():
    with pytest.raises(RecipeError) as e:
        rc.loads("steps:\n  - technique: rtn\n   bits: 4\n")
    assert str(e.value).startswith("not valid YAML at line 3, column 4:")


def test_rules_between_fields_and_missing_files_fail_when_the_recipe_is_read():
    with pytest.raises(RecipeError, match=r"step 1: moefy.top_k \(8\) is more than moefy.experts \(4\)"):
        rc.from_data([{"technique": "moefy", "experts": 4, "top_k": 8}])
    r = rc.from_data([{"technique": "gptq", "calib_text": "/no/such/calib.txt"}])
    with pytest.raises(RecipeError, match="gptq.calib_text: no file at /no/such/calib.txt"):
        r.check_files()


def test_techniques_ticked_in_any_order_run_in_an_order_that_works():
    """The GUI's panel builds a recipe from ticked boxes: put into the working order, every pair of techniques
    that composes at all composes, and pruning comes before the distill that heals it."""
    import itertools
    names = [t.name for t in all_techniques()]
    assert all(rc.working_rank(n) < len(rc.WORKING_ORDER) for n in names), "a technique without a place"
    for a, b in itertools.permutations(names, 2):
        def valid(x, y):
            try:
                rc.of(x, y)
                return True
            except RecipeError:
                return False
        if valid(a, b) or valid(b, a):
            steps = rc.in_working_order([{"technique": b}, {"technique": a}])
            rc.from_data(steps)  # raises if the working order breaks a rule
    for pruner in ("sparsegpt", "wanda", "magnitude_prune", "structured_prune", "low_rank", "moefy"):
        got = [s["technique"] for s in rc.in_working_order([{"technique": "distill"}, {"technique": pruner}])]
        assert got == [pruner, "distill"]
    assert [s["technique"] for s in rc.in_working_order(
        [{"technique": "gptq"}, {"technique": "kv_quant"}, {"technique": "sparsegpt"}])] == \
        ["sparsegpt", "gptq", "kv_quant"]


def test_bundled_recipes_load_by_id_and_each_cites_a_measured_figure():
    shipped = rc.bundled()
    assert len({b.id for b in shipped}) == len(shipped) >= 10
    assert len({b.name for b in shipped}) == len(shipped)  # menus show names
    for b in shipped:
        assert b.recipe.steps and "×" in b.description, b.id
        assert rc.load(b.id) == b.recipe
    with pytest.raises(RecipeError, match="did you mean 'bundled:awq-4bit'"):
        rc.load("bundled:awq-4")


def test_a_broken_bundled_recipe_names_its_file_and_none_can_be_overwritten_by_save(tmp_path, monkeypatch):
    from core import paths
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "ok.yaml").write_text("name: OK\ndescription: 1.0×\nsteps:\n  - technique: rtn\n")
    monkeypatch.setattr(paths, "resources_dir", lambda: tmp_path)
    assert [b.id for b in rc.bundled()] == ["bundled:ok"]
    for bad in ("steps: [\n", "- technique: rtn\n", "steps:\n  - technique: rnt\n"):
        (tmp_path / "recipes" / "broken.yaml").write_text(bad)
        with pytest.raises(RecipeError, match="bundled recipe broken.yaml cannot be read"):
            rc.bundled()
    with pytest.raises(RecipeError, match="shipped recipes; save under another name"):
        rc.of("rtn").save("bundled:ok.yaml")
    assert not (tmp_path / "bundled:ok.yaml").exists()


def test_bundled_recipes_that_cite_the_32k_protocol_are_the_recipes_measured_in_bench_results():
    """A figure in a bundled recipe's description comes from bench/RESULTS.md: the recipe whose description cites
    the issue's 32,768-token protocol must be one recorded there (same steps, same values)."""
    import re
    from pathlib import Path
    results = (Path(__file__).resolve().parent.parent / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    measured = []
    for m in re.finditer(r"`(\[\{\"technique\".*?\}\])`", results):
        steps = json.loads(m.group(1))
        for st in steps:  # recorded before distill had a time budget: those runs ran every step
            if st["technique"] == "distill":
                st.setdefault("minutes", 0)
        try:
            measured.append(rc.from_data(steps).to_dict())
        except (RecipeError, ValueError):
            pass  # a recipe of an older engine
    def text(step: dict) -> dict:
        """calib_text as the text it names: empty is the 200 kB slice, or for distill the whole validation split
        (resources/data/distill.txt, a byte copy of WikiText-2's valid.tokens, which the bench names by path)."""
        name = Path(step.get("calib_text") or "").name
        if step["technique"] == "distill" and name in ("", "valid.tokens", "distill.txt"):
            return {**step, "calib_text": "validation split"}
        return {**step, "calib_text": "slice" if name in ("", "calib.txt") else name}

    cited = [b for b in rc.bundled() if "32,768 tokens" in b.description]
    assert len(cited) >= 8
    for b in cited:
        mine = [text(s) for s in b.recipe.to_dict()["steps"]]

        def same(rec):
            return [text(s) for s in rec["steps"]] == mine
        if b.id == "bundled:rtn-4bit":  # the naive baseline is the tables' reference column, without its steps
            assert re.search(r"\| rtn 4-bit g64 sym \| [0-9.]+ \| 1\.432× \|", results)
            continue
        assert any(same(r) for r in measured), f"{b.id} is not a recipe measured in bench/RESULTS.md"
