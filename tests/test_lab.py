"""Teaching mode's lab checklist ticks itself from the ledger."""
from core.lab import LAB, progress


def run(kind="eval", steps=(), status="done", result=None):
    return {"kind": kind, "status": status, "recipe": {"steps": list(steps)}, "result": result or {}}


def test_each_lab_step_ticks_only_when_its_run_finished():
    assert progress([]) == {s.key: False for s in LAB}
    runs = [run(), run(steps=[{"technique": "rtn", "bits": 8}]), run(steps=[{"technique": "rtn", "bits": 4}],
                                                                      status="failed")]
    p = progress(runs)
    assert p["baseline"] and p["int8"] and not p["int4"] and not p["gptq"]  # a failed run does not count
    runs += [run(steps=[{"technique": "rtn", "bits": 4}]), run(steps=[{"technique": "gptq", "bits": 4}]),
             run(steps=[{"technique": "wanda", "sparsity": 0.5}]), run("compare"),
             run("export", result={"ok": False})]
    p = progress(runs)
    assert all(p[k] for k in ("int4", "gptq", "prune", "compare")) and not p["export"]  # a failed check is no export
    assert progress(runs + [run("export", result={"ok": True})])["export"]


def test_every_technique_ships_an_explainer_with_the_four_parts():
    from core import paths
    from core.techniques.registry import all_techniques
    for t in all_techniques():
        f = paths.resources_dir() / "explainers" / f"{t.name}.md"
        text = f.read_text(encoding="utf-8")
        assert text.startswith(f"# {t.name}"), f.name
        for part in ("## The one formula", "## The sliders", "## Typical failure"):
            assert part in text, (f.name, part)
        for field in t.fields():  # every slider is explained
            assert f"**{field['name']}**" in text, (f.name, field["name"])


def test_explainers_fit_the_teaching_dock_headings_down_and_formulas_wrapping():
    from core.techniques.registry import all_techniques
    from gui.widgets.teach import explainer, for_dock
    for t in all_techniques():
        md = for_dock(explainer(t.name))
        assert "```" not in md and not md.startswith("# ")  # no code block (it cannot wrap), no h1 title
        assert f"### {t.name}" in md


def test_a_bundled_recipe_a_lab_step_names_is_one_the_app_ships():
    import re

    from core.lab import LAB
    from core.recipe import bundled
    names = {b.name for b in bundled()}
    named = [m for s in LAB for m in re.findall(r"bundled recipe '([^']+)'", s.how)]
    assert named and all(n in names for n in named), (named, names)
