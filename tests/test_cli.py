"""`squeeze` from the outside: JSON on stdout, one clear line on stderr for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SQUEEZE = [sys.executable, "-m", "core.cli"]
ROOT = Path(__file__).resolve().parent.parent


def squeeze(*args, check=True):
    p = subprocess.run([*SQUEEZE, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_techniques_json_lists_the_three_with_full_slider_metadata():
    ts = {t["name"]: t for t in json.loads(squeeze("techniques", "--json").stdout)}
    assert {"rtn", "magnitude_prune", "dynamic_int8"} <= set(ts)
    bits = {f["name"]: f for f in ts["rtn"]["fields"]}["bits"]
    assert (bits["min"], bits["max"], bits["step"], bits["default"], bits["unit"]) == (2, 8, 1, 4, "bits")
    for t in ts.values():
        for f in t["fields"]:
            assert set(f) >= {"name", "type", "default", "min", "max", "step", "choices", "unit", "help"}


def test_eval_prints_one_json_object_with_the_promised_keys_and_records_a_run(tiny_model, short_text, home, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("steps:\n  - technique: rtn\n    bits: 4\n    group_size: 64\n")
    p = squeeze("eval", tiny_model, "--recipe", rec, "--text", short_text, "--max-tokens", 256, "--context", 64,
                "--new-tokens", 4, "--repeats", 1, "--json")
    r = json.loads(p.stdout)
    for k in ("ppl", "tokens_scored", "context", "size_bytes", "theoretical_bytes", "params", "nonzero_params",
              "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes", "seconds"):
        assert k in r, k
    assert r["context"] == 64 and r["tokens_scored"] == 256
    runs = json.loads(squeeze("runs", "--json").stdout)
    assert [x["id"] for x in runs] == [r["job_id"]] and runs[0]["status"] == "done"


def test_bundled_recipes_are_listed_with_what_they_measured_and_run_by_name(tiny_model, short_text, home):
    shipped = json.loads(squeeze("recipe", "--list", "--json").stdout)
    ids = [r["id"] for r in shipped]
    assert {"bundled:gptq-4bit", "bundled:smoothquant-w8a8", "bundled:sparsegpt-50-distill"} <= set(ids)
    assert all(r["name"] and "×" in r["description"] and r["steps"] for r in shipped)
    text = squeeze("recipe", "--list").stdout
    assert all(i in text for i in ids) and "perplexity 1.087× fp32" in text
    steps = json.loads(squeeze("recipe", "bundled:rtn-4bit", "--json").stdout)["steps"]
    assert [(s["technique"], s["bits"], s["group_size"]) for s in steps] == [("rtn", 4, 64)]
    r = json.loads(squeeze("eval", tiny_model, "--recipe", "bundled:rtn-4bit", "--text", short_text, "--max-tokens",
                           128, "--context", 64, "--new-tokens", 2, "--repeats", 1, "--json").stdout)
    row = next(x for x in json.loads(squeeze("runs", "--json").stdout) if x["id"] == r["job_id"])
    assert row["recipe"]["steps"] == steps


def test_bare_squeeze_shows_its_commands_and_an_empty_answer_says_so(home):
    p = squeeze()
    assert "usage: squeeze" in p.stdout and "techniques" in p.stdout
    p = squeeze("runs", "--model", "bundled:nosuch")
    assert p.stdout == "" and "no runs of bundled:nosuch in the ledger" in p.stderr
    assert "deleted 0 run(s)" in squeeze("runs", "--clear-failed").stderr


def test_a_typo_in_the_model_the_text_or_the_export_folder_leaves_no_run_in_the_ledger(tiny_model, tmp_path, home):
    # each was a failed run in `squeeze runs`, and its model a junk entry in the GUI's model list
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    for argv, words in ((["eval", tmp_path / "nope"], "does not exist"),
                        (["eval", "bundled:smollm2-13"], "did you mean 'bundled:smollm2-135m'"),
                        (["eval", tiny_model, "--text", tmp_path / "gone.txt"], "gone.txt"),
                        (["export", tiny_model, "--out", used], "not empty")):
        p = squeeze(*argv, check=False)
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr
        p = squeeze(*argv, "--json", check=False)  # a script reading stdout still gets its one object
        assert p.returncode == 2 and words in json.loads(p.stdout)["error"], p.stdout
    assert json.loads(squeeze("runs", "--json").stdout) == []
    assert (used / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args, words", [
    (["eval", "/no/such/folder"], "does not exist"),
    (["eval", "{tmp}"], "not a model folder"),
    (["eval", "{tiny}", "--recipe", "{tmp}/bad.yaml"], "rtn.bits"),
    (["eval", "{tiny}", "--text", "{tmp}/empty.txt"], "empty"),
    (["eval", "{tiny}", "--text", "{tmp}/short.txt", "--context", "512"], "fewer than the context"),
    (["eval", "{truncated}"], "truncated"),
    (["eval", "{pickled}"], "pickle"),
    (["recipe", "{tmp}/broken.json"], "not valid JSON"),
    (["eval", "{tiny}", "--recipe", "bundled:gptq-4bt"], "did you mean 'bundled:gptq-4bit'"),
    (["recipe", "bundled:nope"], "no bundled recipe 'bundled:nope' (`squeeze"),  # no far-fetched "did you mean"
    (["recipe"], "--list for the bundled recipes"),
    (["recipe", "{tmp}/typo.yaml"], "not valid YAML at line 3, column 4"),
    (["eval", "{notok}"], "has no tokenizer"),
    (["eval", "{tiny}", "--new-tokens", "100000"], "exceed the model's"),
    (["eval", "{tiny}", "--max-tokens", "64", "--context", "128"], "less than one window of context 128"),
    (["generate", "{tiny}", " "], "the prompt is empty"),
    (["generate", "{tiny}", "Hello", "--new-tokens", "100000"], "exceed the model's"),
    (["sensitivity", "{tiny}", "--setting", "99"], "a whole number from 2 to 8"),
    (["sensitivity", "{tiny}", "--load", "{tmp}/broken.json"], "cannot read the scan"),
    (["sensitivity", "{tiny}", "--budget-mb", "5", "--recipe-out", "{tmp}/mp.txt"], "must end in .yaml"),
    (["sensitivity", "{tiny}", "--technique", "magnitude_prune", "--budget-mb", "5"], "scan again with rtn"),
    (["sensitivity", "{tiny}", "--setting", "8", "--budget-mb", "5"], "scan at fewer bits"),
])
def test_bad_input_gives_one_line_and_no_traceback(args, words, tiny_model, tmp_path, home):
    import shutil
    (tmp_path / "bad.yaml").write_text("steps:\n  - technique: rtn\n    bits: 11\n")
    (tmp_path / "broken.json").write_text('{"steps": [')
    (tmp_path / "typo.yaml").write_text("steps:\n  - technique: rtn\n   bits: 4\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Just a few words.")
    trunc = tmp_path / "truncated"
    shutil.copytree(tiny_model, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    pick = tmp_path / "pickled"
    pick.mkdir()
    shutil.copy(Path(tiny_model) / "config.json", pick)
    (pick / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    notok = tmp_path / "notok"
    shutil.copytree(tiny_model, notok, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*", "special*"))
    subs = {"{tmp}": str(tmp_path), "{tiny}": tiny_model, "{truncated}": str(trunc), "{pickled}": str(pick),
            "{notok}": str(notok)}
    argv = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    p = squeeze(*argv, "--json", check=False)
    assert p.returncode == 2
    assert words in json.loads(p.stdout)["error"]  # with --json, the one object on stdout says it too
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("squeeze: error:")]
    assert len(lines) == 1 and words in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not list((home / "workspace").glob("variants/*"))
    if args[0] == "sensitivity" or words == "empty":  # refused before a job starts: no failed run left behind
        from core.ledger import Ledger
        assert Ledger(home / "data" / "ledger.sqlite").rows() == []


def test_a_report_or_a_ledger_that_cannot_be_written_or_read_gets_one_line(tmp_path, home):
    (tmp_path / "afile").write_text("x")
    ledger = home / "data" / "ledger.sqlite"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    from core.ledger import Ledger
    from core.jobs.spec import JobSpec
    Ledger(ledger).start(JobSpec("m"))  # one row, so the report has something to write
    for out, words in ((tmp_path / "afile" / "study.html", "afile is a file, not a folder"),
                       (tmp_path, "use .html, .csv or .json")):
        p = squeeze("report", out, check=False)
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr
    ok = tmp_path / "study.html"
    squeeze("report", ok)
    assert ok.stat().st_mode & 0o044 == 0o044  # readable by others: a report is for sharing
    ledger.write_bytes(b"not a database" * 100)
    p = squeeze("runs", check=False)
    assert p.returncode == 2 and "cannot open the run ledger" in p.stderr and "Traceback" not in p.stderr


def test_a_job_stopped_by_ctrl_c_or_a_signal_closes_its_ledger_row_and_leaves_no_temp_folder(tiny_model, short_text,
                                                                                             home):
    import signal
    import time
    rec = Path(home) / "r.yaml"
    rec.write_text("steps:\n  - technique: rtn\n    bits: 4\n")
    p = subprocess.Popen([*SQUEEZE, "eval", tiny_model, "--recipe", str(rec), "--text", short_text, "--max-tokens",
                          "256", "--context", "64", "--new-tokens", "4", "--repeats", "1000"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    from core.ledger import Ledger
    while time.monotonic() < deadline and not any(r["status"] == "running" for r in Ledger().rows()):
        time.sleep(0.2)
    time.sleep(2)  # inside the job (1,000 timed decode repeats)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    rows = Ledger().rows()
    assert len(rows) == 1 and rows[0]["status"] == "cancelled" and "stopped" in rows[0]["error"]
    assert not list((Path(home) / "workspace").glob("variants/*.tmp"))


def test_a_variant_write_that_is_interrupted_leaves_no_half_written_folder(tiny_model, tmp_path, monkeypatch):
    import safetensors.torch

    from core import models
    from core.variant import save_variant
    model, tok, _ = models.load(tiny_model)

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_variant(model, tok, {}, [], tmp_path / "v", {})
    assert list(tmp_path.iterdir()) == []


def test_runs_says_under_a_run_when_its_distill_budget_ran_fewer_steps_than_asked(home):
    from core.jobs.spec import JobSpec
    from core.ledger import Ledger
    ledger = Ledger(home / "data" / "ledger.sqlite")
    spec = JobSpec("m", recipe={"steps": [{"technique": "distill", "steps": 1000, "minutes": 14}]})
    ledger.start(spec)
    ledger.finish(spec.job_id, "done", {"ppl": 30.0, "steps": [
        {"technique": "distill", "seconds": 840.0, "steps": 220, "steps_asked": 1000, "minutes": 14.0}]})
    lines = squeeze("runs").stdout.splitlines()
    i = next(k for k, t in enumerate(lines) if t.startswith(spec.job_id))
    assert lines[i + 1].strip() == "distill ran 220 of its 1000 steps: its 14-minute budget held no more"


def test_a_model_folder_is_one_model_however_its_path_is_typed(tiny_model, short_text, home):
    import os
    relative = os.path.relpath(tiny_model, ROOT) + "/"  # as tab completion writes it, from the working folder
    squeeze("eval", relative, "--text", short_text, "--max-tokens", "256", "--context", "128",
            "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1")
    rows = json.loads(squeeze("runs", "--model", tiny_model, "--json").stdout)
    assert [r["model"] for r in rows] == [str(Path(tiny_model).resolve())]
    assert json.loads(squeeze("runs", "--model", relative, "--json").stdout) == rows


def test_listing_models_on_a_fresh_install_converts_nothing(tmp_path):
    import os
    fresh = tmp_path / "fresh-home"
    p = subprocess.run([*SQUEEZE, "models", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, SQUEEZE_HOME=str(fresh)))
    assert p.returncode == 0, p.stderr
    bundled = {m["id"]: m for m in json.loads(p.stdout)}["bundled:smollm2-135m"]
    assert bundled["params"] is None  # known once the first job has converted it
    assert not any((fresh / "cache").rglob("*.safetensors"))  # (a conversion: ~40 s and 0.5 GB)


def test_runs_names_an_export_and_a_failed_check(home):
    from core.jobs.spec import JobSpec
    from core.ledger import Ledger
    spec = JobSpec("m", kind="export", export={"out": "/x", "quantize": "int8"})
    Ledger().start(spec)
    Ledger().finish(spec.job_id, "done", result={"ppl_onnx": 30.0, "ok": False, "failure": "size 0.4x fp32"})
    line = next(ln for ln in squeeze("runs").stdout.splitlines() if ln.startswith(spec.job_id))
    assert "failed check" in line and "ONNX int8 of baseline" in line and "size 0.4x fp32" in line
