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
