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


@pytest.mark.parametrize("args, words", [
    (["eval", "/no/such/folder"], "does not exist"),
    (["eval", "{tmp}"], "not a model folder"),
    (["eval", "{tiny}", "--recipe", "{tmp}/bad.yaml"], "rtn.bits"),
    (["eval", "{tiny}", "--text", "{tmp}/empty.txt"], "empty"),
    (["eval", "{tiny}", "--text", "{tmp}/short.txt", "--context", "512"], "fewer than the context"),
    (["eval", "{truncated}"], "truncated"),
    (["eval", "{pickled}"], "pickle"),
    (["recipe", "{tmp}/broken.json"], "not valid JSON"),
])
def test_bad_input_gives_one_line_and_no_traceback(args, words, tiny_model, tmp_path, home):
    import shutil
    (tmp_path / "bad.yaml").write_text("steps:\n  - technique: rtn\n    bits: 11\n")
    (tmp_path / "broken.json").write_text('{"steps": [')
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
    subs = {"{tmp}": str(tmp_path), "{tiny}": tiny_model, "{truncated}": str(trunc), "{pickled}": str(pick)}
    argv = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    p = squeeze(*argv, "--json", check=False)
    assert p.returncode == 2
    assert p.stdout == ""
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("squeeze: error:")]
    assert len(lines) == 1 and words in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not list((home / "workspace").glob("variants/*"))
