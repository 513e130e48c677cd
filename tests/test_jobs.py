"""The worker contract, seen from the parent: events in order, cancel within 2 s, a killed
worker marks its run failed and every earlier ledger row stays."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from core.jobs.client import WorkerJob, run_inline
from core.jobs.spec import JobSpec
from core.ledger import Ledger


def _collect(spec):
    events, lock = [], threading.Lock()

    def on(e):
        with lock:
            events.append(e)
    return events, WorkerJob(spec, on).start()


def long_eval(tiny_eval):
    # the tiny model decodes ~1,000 tok/s: this keeps a worker busy for tens of seconds
    return {**tiny_eval, "new_tokens": 400, "repeats": 60}


def test_a_worker_job_reports_the_contract_in_order(tiny_model, tiny_eval, home):
    events, job = _collect(JobSpec(model=tiny_model, recipe={"steps": [{"technique": "rtn", "bits": 4}]},
                                   eval=tiny_eval))
    assert job.wait(120)
    types = [e["type"] for e in events if e["type"] != "log"]
    assert types[0] == "started" and types[-1] == "finished" and types[-2] == "result"
    stages = [e["stage"] for e in events if e["type"] == "progress"]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == ["load", "apply", "save", "evaluate"]
    fr = [e["fraction"] for e in events if e["type"] == "progress"]
    assert fr == sorted(fr) and fr[-1] == 1.0
    row = Ledger().get(job.spec.job_id)
    assert row["status"] == "done" and row["result"]["ppl"] > 1


def test_cancel_stops_a_running_job_within_2_seconds(tiny_model, tiny_eval, home):
    events, job = _collect(JobSpec(model=tiny_model, eval=long_eval(tiny_eval)))
    deadline = time.monotonic() + 60
    while not any(e["type"] == "progress" and e["stage"] == "evaluate" for e in list(events)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t0 = time.monotonic()
    job.cancel()
    assert job.wait(5)
    assert time.monotonic() - t0 < 2.0
    assert [e["type"] for e in events][-2:] == ["cancelled", "finished"]
    assert Ledger().get(job.spec.job_id)["status"] == "cancelled"


def test_kill_9_marks_the_run_failed_and_keeps_earlier_rows(tiny_model, tiny_eval, home):
    first = run_inline(JobSpec(model=tiny_model, eval=tiny_eval))
    assert first.outcome == "done"
    events, job = _collect(JobSpec(model=tiny_model, eval=long_eval(tiny_eval)))
    deadline = time.monotonic() + 60
    while not any(e["type"] == "progress" for e in list(events)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    assert job.wait(10)
    err = [e for e in events if e["type"] == "error"]
    assert err and err[0]["kind"] == "crashed" and events[-1]["type"] == "finished"
    rows = {r["id"]: r for r in Ledger().rows()}
    assert rows[job.spec.job_id]["status"] == "failed"
    assert rows[first.spec.job_id]["status"] == "done" and rows[first.spec.job_id]["result"]["ppl"] > 1


def test_a_worker_that_cannot_start_fails_its_run_in_the_ledger(tiny_model, tiny_eval, home, monkeypatch):
    from core.jobs import client
    monkeypatch.setattr(client, "worker_command", lambda: [str(ROOT / "no-such-python"), "--worker"])
    events, job = _collect(JobSpec(model=tiny_model, eval=tiny_eval))
    assert job.wait(10)
    assert [e["type"] for e in events] == ["error", "finished"]
    assert "cannot start the worker" in events[0]["message"]
    row = Ledger().get(job.spec.job_id)
    assert row["status"] == "failed" and "cannot start the worker" in row["error"]  # not left "running"


def test_a_job_left_running_by_a_dead_app_is_marked_interrupted(tiny_model, tiny_eval, home):
    led = Ledger()
    spec = JobSpec(model=tiny_model, eval=tiny_eval)
    led.start(spec, pid=2 ** 22 + 12345)  # no such process
    assert led.mark_interrupted() == 1
    assert led.get(spec.job_id)["status"] == "interrupted"


@pytest.mark.parametrize("bad, words", [
    ({"model": "/no/such/model"}, "does not exist"),
    ({"recipe": {"steps": [{"technique": "rtm"}]}}, "did you mean 'rtn'"),
    ({"eval": {"text": "/no/such/text.txt"}}, "text file not found"),
])
def test_bad_input_fails_the_job_with_one_clear_message_and_writes_nothing(tiny_model, tiny_eval, home, bad, words):
    spec = JobSpec(model=tiny_model, eval=tiny_eval)
    for k, v in bad.items():
        setattr(spec, k, {**getattr(spec, k), **v} if k == "eval" else v)
    events, job = _collect(spec)
    assert job.wait(60)
    err = [e for e in events if e["type"] == "error"]
    assert len(err) == 1 and words in err[0]["message"] and "Traceback" not in err[0]["message"]
    assert "\n" not in err[0]["message"]
    assert not list((home / "workspace").glob("variants/*"))
    assert Ledger().get(spec.job_id)["status"] == "failed"


def test_killing_a_process_mid_write_leaves_the_ledger_readable_with_every_committed_row(home, tmp_path):
    import sqlite3
    import subprocess
    import sys
    code = """
import sys, time
from core.jobs.spec import JobSpec
from core.ledger import Ledger
led = Ledger()
i = 0
while True:
    s = JobSpec("m", recipe={"steps": [{"technique": "rtn", "bits": 4, "pad": "x" * 20000}]})
    led.start(s)
    led.finish(s.job_id, "done", result={"ppl": float(i), "blob": "y" * 50000})
    print(i, flush=True)
    i += 1
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    seen = 0
    t0 = time.time()
    while seen < 30 and time.time() - t0 < 60:  # let it commit some rows, then kill it mid-stream
        p.stdout.readline()
        seen += 1
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stdout.close()
    rows = Ledger().rows()
    assert len(rows) >= seen  # every row it reported committed is there ...
    for r in rows:             # ... whole: a finished row has its full result
        assert r["status"] in ("running", "done") and (r["status"] != "done" or len(r["result"]["blob"]) == 50000)
    with sqlite3.connect(Ledger().path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _run_logged(spec):
    logs = []
    r = run_inline(spec, on_event=lambda e: logs.append(e["text"]) if e["type"] == "log" else None)
    assert r.outcome == "done", r.error
    return r.result, logs


PRUNE = {"technique": "structured_prune", "layers": 0.0, "heads": 0.0, "ffn": 0.3, "samples": 8, "seq_len": 128}
DISTILL = {"technique": "distill", "steps": 10, "seq_len": 128, "samples": 8, "batch_size": 2}


def test_adding_a_step_starts_from_the_saved_variant_of_the_first_steps(tiny_model, tiny_eval, home):
    first, _ = _run_logged(JobSpec(model=tiny_model, recipe={"steps": [PRUNE]}, eval=tiny_eval))
    longer = {"steps": [PRUNE, DISTILL]}
    from core import preflight
    est = preflight.for_spec(JobSpec(model=tiny_model, recipe=longer, eval=tiny_eval))
    est_fresh = preflight.for_spec(JobSpec(model=tiny_model, recipe=longer, eval=tiny_eval, reuse=False))
    assert est["reused"] == 1 and est["seconds"] < est_fresh["seconds"]  # the estimate leaves the prune out
    reused, logs = _run_logged(JobSpec(model=tiny_model, recipe=longer, eval=tiny_eval))
    assert any("reusing the saved variant" in m for m in logs)
    assert not any(m.startswith("applying structured_prune") for m in logs)  # only distill ran
    assert reused["steps"][0]["reused_from"] == first["variant_dir"].rsplit("/", 1)[-1]
    assert reused["steps"][0]["seconds"] == first["steps"][0]["seconds"]  # apply time still says what it cost
    fresh, logs = _run_logged(JobSpec(model=tiny_model, recipe=longer, eval=tiny_eval, reuse=False))
    assert any(m.startswith("applying structured_prune") for m in logs)
    assert reused["ppl"] == pytest.approx(fresh["ppl"], rel=1e-4)  # the same model either way
    assert reused["size_bytes"] == fresh["size_bytes"]


def test_the_same_recipe_again_is_the_saved_file_under_a_new_name(tiny_model, tiny_eval, home):
    recipe = {"steps": [{"technique": "rtn", "bits": 4}]}
    first, _ = _run_logged(JobSpec(model=tiny_model, recipe=recipe, eval=tiny_eval))
    again, logs = _run_logged(JobSpec(model=tiny_model, recipe=recipe, eval={**tiny_eval, "max_tokens": 256}))
    assert not any(m.startswith("applying") for m in logs)
    assert again["variant_dir"] != first["variant_dir"] and again["size_bytes"] == first["size_bytes"]
    import shutil
    shutil.rmtree(first["variant_dir"])  # deleting the first run's files leaves the second's whole
    from core.variant import load_variant
    load_variant(Path(again["variant_dir"]))


def test_a_packed_prefix_or_other_base_weights_are_not_reused(tiny_model, tiny_eval, home, tmp_path,
                                                               tiny_tokenizer_dir):
    from conftest import make_tiny_llama
    _run_logged(JobSpec(model=tiny_model, recipe={"steps": [{"technique": "rtn", "bits": 8}]}, eval=tiny_eval))
    _, logs = _run_logged(JobSpec(model=tiny_model, eval=tiny_eval,
                                  recipe={"steps": [{"technique": "rtn", "bits": 8}, {"technique": "kv_quant"}]}))
    assert not any("reusing" in m for m in logs)  # a packed variant loads back dequantized: start over
    other = str(make_tiny_llama(tmp_path / "other", tiny_tokenizer_dir, seed=1))
    _run_logged(JobSpec(model=other, recipe={"steps": [PRUNE]}, eval=tiny_eval))
    make_tiny_llama(tmp_path / "other", tiny_tokenizer_dir, seed=2)  # same folder, new weights
    _, logs = _run_logged(JobSpec(model=other, recipe={"steps": [PRUNE, DISTILL]}, eval=tiny_eval))
    assert not any("reusing" in m for m in logs)


def test_deleting_a_run_removes_its_row_its_exports_and_their_saved_folders_and_nothing_shared_or_outside(
        tiny_model, tiny_eval, home):
    import subprocess
    import sys

    from core import paths
    from core.errors import LedgerError
    ledger = Ledger()
    rec = run_inline(JobSpec(model=tiny_model, eval=tiny_eval, recipe={"steps": [{"technique": "rtn", "bits": 4}]}))
    variant = Path(rec.result["variant_dir"])
    assert rec.outcome == "done" and variant.is_dir()
    mode = lambda name: (variant / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("model.safetensors") == mode("config.json")  # readable as the umask allows, like its neighbours

    def export(folder: Path, parent: str) -> JobSpec:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(b"onnx")
        spec = JobSpec(model=tiny_model, kind="export", parent_id=parent)
        ledger.start(spec)
        ledger.finish(spec.job_id, "done", result={"path": str(folder / "model.onnx")})
        return spec
    mine = export(paths.workspace_dir() / "exports" / "mine", rec.spec.job_id)
    outside = export(home / "elsewhere", rec.spec.job_id)  # placed outside the workspace by the user: it stays
    other = run_inline(JobSpec(model=tiny_model, eval=tiny_eval, recipe={"steps": [{"technique": "rtn", "bits": 8}]}))
    shared = export(paths.workspace_dir() / "exports" / "shared", other.spec.job_id)
    shared_mine = export(paths.workspace_dir() / "exports" / "shared", rec.spec.job_id)  # another run's folder too
    failed = JobSpec(model=tiny_model, recipe={"steps": [{"technique": "rtn", "bits": 3}]})
    ledger.start(failed)
    saved_then_failed = paths.workspace_dir() / "variants" / failed.job_id  # saved, then the measurement failed
    saved_then_failed.mkdir(parents=True)
    ledger.finish(failed.job_id, "failed", error="x")
    running = JobSpec(model=tiny_model)
    ledger.start(running, os.getpid())
    with pytest.raises(LedgerError, match="still running"):
        ledger.forget(running.job_id)

    ids, removed = ledger.forget(rec.spec.job_id)
    assert set(ids) == {rec.spec.job_id, mine.job_id, outside.job_id, shared_mine.job_id}
    assert ids[-1] == rec.spec.job_id and set(removed) == {variant.resolve(), (paths.workspace_dir() / "exports/mine").resolve()}
    assert (home / "elsewhere" / "model.onnx").is_file() and Path(tiny_model).is_dir()
    assert (paths.workspace_dir() / "exports" / "shared" / "model.onnx").is_file()  # still another run's export
    assert {r["id"] for r in ledger.rows()} == {other.spec.job_id, shared.job_id, failed.job_id, running.job_id}
    ledger.finish(running.job_id, "failed", error="x")
    p = subprocess.run([sys.executable, "-m", "core.cli", "runs", "--clear-failed", "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "deleted 2 run(s) and 1 saved folder(s)" in p.stderr, p.stderr
    assert {r["id"] for r in json.loads(p.stdout)} == {other.spec.job_id, shared.job_id}
    assert not saved_then_failed.exists()
