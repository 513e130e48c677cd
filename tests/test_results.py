"""core/results.py: ledger rows -> table rows (Δ% vs baseline, × smaller, × faster) and the
Pareto front, on plain dicts."""
import pytest

from core import results

BASE_RECIPE = {"steps": []}
RTN4 = {"steps": [{"technique": "rtn", "bits": 4}]}


def run(id, recipe=BASE_RECIPE, status="done", created=0, model="m", key="k", kind="eval", **res):
    return {"id": id, "kind": kind, "model": model, "recipe": recipe, "label": id, "eval_key": key,
            "status": status, "error": None if status == "done" else "boom", "created": created,
            "settings": {"eval": {"text": None, "max_tokens": 4096, "context": 512}},
            "result": res or None}


def test_delta_and_ratios_against_the_baseline_of_the_same_model_and_settings():
    runs = [
        run("base", ppl=20.0, size_bytes=400_000_000, decode_tokens_per_s=50.0, created=1),
        run("q4", RTN4, ppl=22.0, size_bytes=100_000_000, decode_tokens_per_s=75.0, created=2),
        run("other-key", RTN4, key="k2", ppl=30.0, size_bytes=100_000_000, created=3),
    ]
    rows = {r["id"]: r for r in results.table_rows(runs)}
    assert rows["base"]["baseline"] and rows["base"]["delta_ppl_pct"] == pytest.approx(0.0)
    assert rows["base"]["x_smaller"] == pytest.approx(1.0)
    assert rows["q4"]["delta_ppl_pct"] == pytest.approx(10.0)
    assert rows["q4"]["x_smaller"] == pytest.approx(4.0)
    assert rows["q4"]["x_faster"] == pytest.approx(1.5)
    # no baseline measured under these settings: nothing to compare with
    assert rows["other-key"]["delta_ppl_pct"] is None and rows["other-key"]["x_smaller"] is None


def test_latest_finished_baseline_wins_and_failed_runs_stay_visible():
    runs = [
        run("old-base", ppl=10.0, size_bytes=100, created=1),
        run("new-base", ppl=20.0, size_bytes=100, created=2),
        run("failed-base", status="failed", created=3),
        run("q", RTN4, ppl=30.0, size_bytes=50, created=4),
        run("crashed", RTN4, status="failed", created=5),
        run("export", RTN4, kind="export", ppl_onnx=30.0, created=6),
    ]
    rows = {r["id"]: r for r in results.table_rows(runs)}
    assert rows["q"]["delta_ppl_pct"] == pytest.approx(50.0)
    assert rows["crashed"]["status"] == "failed" and rows["crashed"]["error"] == "boom"
    assert rows["crashed"]["ppl"] is None and rows["crashed"]["delta_ppl_pct"] is None
    # `squeeze export` records no parent: its row goes under the latest finished run of that recipe
    order = [r["id"] for r in results.table_rows(runs)]
    assert rows["export"]["parent_id"] == "q" and order.index("export") == order.index("q") + 1
    assert rows["export"]["label"].startswith("↳ ONNX fp32 · q") and rows["export"]["ppl"] == 30.0


def test_an_export_of_a_recipe_never_evaluated_has_a_row_of_its_own():
    runs = [run("base", ppl=20.0, size_bytes=400, created=1),
            run("cli-export", RTN4, kind="export", ppl_onnx=21.0, size_bytes_onnx=100, created=2)]
    rows = {r["id"]: r for r in results.table_rows(runs)}
    assert rows["cli-export"]["export"] and rows["cli-export"]["parent_id"] is None
    assert rows["cli-export"]["delta_ppl_pct"] == pytest.approx(5.0)  # against its settings' baseline


def test_pareto_front_lower_x_is_better():
    pts = [("a", 1.0, 10.0), ("b", 2.0, 5.0), ("c", 3.0, 6.0), ("d", 4.0, 1.0), ("e", 2.0, 7.0)]
    assert results.pareto_front(pts, x_lower_better=True) == ["a", "b", "d"]


def test_pareto_front_higher_x_is_better():
    # decode tok/s: more is better; a point is on the front unless one is faster and better
    pts = [("slow-good", 10.0, 1.0), ("fast-bad", 30.0, 9.0), ("mid", 20.0, 2.0), ("dominated", 15.0, 3.0)]
    assert results.pareto_front(pts, x_lower_better=False) == ["slow-good", "mid", "fast-bad"]


def test_pareto_front_ties_and_empty():
    assert results.pareto_front([]) == []
    assert results.pareto_front([("a", 1.0, 2.0), ("b", 1.0, 2.0)]) == ["a"]
    assert results.pareto_front([("a", 1.0, 3.0), ("b", 1.0, 2.0)]) == ["b"]


def test_trade_off_points_only_finished_runs_of_the_eval_key():
    runs = [
        run("base", ppl=20.0, size_bytes=400_000_000, decode_tokens_per_s=50.0, created=1),
        run("q4", RTN4, ppl=22.0, size_bytes=100_000_000, decode_tokens_per_s=40.0, created=2),
        run("running", RTN4, status="running", created=3),
        run("k2", RTN4, key="k2", ppl=1.0, size_bytes=1, decode_tokens_per_s=1.0, created=4),
    ]
    rows = results.table_rows(runs)
    pts, front = results.trade_off(rows, "size", eval_key="k")
    assert [p["id"] for p in pts] == ["base", "q4"]
    assert pts[0]["baseline"] and pts[0]["x"] == pytest.approx(400.0)
    assert front == ["q4", "base"]
    pts, front = results.trade_off(rows, "decode", eval_key="k")
    assert front == ["base"]  # faster and better


def test_an_onnx_export_is_plotted_but_stays_off_the_front_of_the_torch_runs():
    rows = [_row("base", "baseline", 20.0, 400, 50.0, 0.0) | {"baseline": True},
            _row("q4", "rtn", 22.0, 100, 40.0, 10.0) | {"baseline": False},
            _row("x", "ONNX int8", 21.0, 90, 500.0, 5.0) | {"baseline": False, "export": True}]
    for axis in ("size", "decode"):
        pts, front = results.trade_off(rows, axis, eval_key="k")
        assert {p["id"]: p["export"] for p in pts} == {"base": False, "q4": False, "x": True}
        assert "x" not in front  # smaller and faster than both, yet onnxruntime's speed is not torch's
    assert results.fmt_pct(-0.04) == "+0.0 %" and results.fmt_pct(-0.06) == "-0.1 %"


def test_formatting():
    assert results.fmt_mb(538_090_408) == "538.1"
    assert results.fmt_mb(232_792) == "0.23"
    assert results.fmt_x(3.456) == "3.46×"
    assert results.fmt_pct(10) == "+10.0 %" and results.fmt_pct(-2.04) == "-2.0 %"
    assert results.fmt_count(134_515_008) == "134.5 M" and results.fmt_count(163_774) == "163.8 k"
    assert results.fmt_ppl(None) == "" and results.fmt_ppl(17.12345) == "17.123"
    row = results.table_rows([run("base", ppl=20.0, size_bytes=100)])[0]
    assert [results.cell(row, c) for c in results.COLUMNS][:3] == ["done", "base", "20.000"]
    assert results.fmt_eval({"text": "/a/b/wiki.txt", "max_tokens": 512, "context": 128}) == "wiki.txt 512 tok × 128"


def _row(i, label, ppl, size_mb, decode, delta):
    return {"id": i, "label": label, "status": "done", "ppl": ppl, "size_bytes": size_mb * 1e6,
            "decode_tokens_per_s": decode, "delta_ppl_pct": delta, "eval_key": "k"}


def test_recommend_picks_the_best_row_that_meets_the_target_and_says_why():
    rows = [_row("b", "baseline", 20.0, 500, 10, 0.0), _row("q8", "rtn 8", 20.1, 140, 12, 0.5),
            _row("q4", "gptq 4", 21.5, 90, 14, 7.5), _row("q2", "rtn 2", 90.0, 60, 15, 350.0)]
    best, why = results.recommend(rows, "size", 100)
    assert best["id"] == "q4" and "lowest perplexity" in why and "≤ 100 MB" in why
    best, why = results.recommend(rows, "delta_ppl", 1.0)
    assert best["id"] == "q8" and "smallest file" in why
    best, why = results.recommend(rows, "decode", 11)
    assert best["id"] == "q8"
    best, why = results.recommend(rows, "size", 10)
    assert best is None and "No run has size on disk ≤ 10 MB" in why and "rtn 2 at 60.0 MB" in why


def test_a_distill_that_its_budget_cut_short_says_how_many_steps_ran():
    recipe = {"steps": [{"technique": "distill", "steps": 1000, "minutes": 14.0}]}
    short = [{"technique": "distill", "seconds": 840.0, "steps": 220, "steps_asked": 1000, "minutes": 14.0}]
    whole = [{"technique": "distill", "seconds": 300.0, "steps": 80, "steps_asked": 80, "minutes": 15.0}]
    rows = {r["id"]: r for r in results.table_rows([run("base", ppl=20.0), run("cut", recipe, ppl=30.0, steps=short),
                                                    run("all", recipe, ppl=31.0, steps=whole)])}
    assert rows["cut"]["ran"] == ["distill ran 220 of its 1000 steps: its 14-minute budget held no more"]
    assert rows["all"]["ran"] == [] and rows["base"]["ran"] == []
