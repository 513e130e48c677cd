"""distill on the tiny Llama: lowers the KL to the teacher after layers are pruned, resumes a
cancelled run to the same final loss, streams its loss, and is listed with full metadata."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import models
from core import recipe as rc
from core.calibration import samples
from core.errors import Cancelled, RecipeError
from core.jobs.run import run_job
from core.jobs.spec import JobSpec
from core.techniques import registry
from core.techniques.base import StepContext
from core.techniques.distillation import CKPT_FILE, _hidden_loss, checkpoint_dir, kd_loss, layer_map

from conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(samples=16, seq_len=128, batch_size=4, lr=3e-3, temperature=1.0)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory, tiny_tokenizer_dir) -> str:
    # a wider init than HF's default gives the random teacher non-flat distributions to imitate
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny4"), tiny_tokenizer_dir, seed=3,
                               num_hidden_layers=4, initializer_range=0.08))


HALF_THE_LAYERS = ("structured_prune", {"layers": 0.5, "ffn": 0.0, "samples": 8, "seq_len": 128})


def _pruned_student(model_id: str, key: str = "distill-test", prune=HALF_THE_LAYERS):
    """(student pruned by `prune` = (technique, values), ctx whose teacher is the unpruned model)."""
    model, tok, _ = models.load(model_id)
    ctx = StepContext(tokenizer=tok, state_key=key)
    tech = registry.get(prune[0])
    tech.apply(model, tech.make(prune[1]), ctx)
    ctx.base_model = lambda: models.load(model_id)[0]
    return model, tok, ctx


def _kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(kd_loss(student(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits, 1.0))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_distillation_loss_and_its_gradient_are_the_textbook_kl(temperature):
    # the loss is hand-written in cache-sized chunks: it must equal T^2 * KL(teacher_T || student_T) and its
    # gradient, on more tokens than one chunk, for a plain and a weighted loss
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(3, 11, 97, generator=g) * 3).requires_grad_()
    t = torch.randn(3, 11, 97, generator=g) * 3
    T = temperature
    want = (T * T) * (torch.log_softmax(t / T, -1).exp()
                      * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    for weight in (1.0, 0.5):  # the loss alone, and weighted inside a larger one
        (weight * want).backward(retain_graph=True)
        want_grad, s.grad = s.grad.clone(), None
        got = kd_loss(s, t, T)
        (weight * got).backward()
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
        assert torch.allclose(s.grad, want_grad, atol=1e-7, rtol=1e-4)
        s.grad = None
    assert float(got.detach()) > 0.1 and float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-5)  # 0 only when they agree


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_distill_after_dropping_layers_lowers_the_kl_on_held_out_text(tiny4, home, precision):
    student, tok, ctx = _pruned_student(tiny4, key=f"distill-{precision}")
    lines = []
    ctx.log = lines.append
    assert student.config.num_hidden_layers == 2
    teacher = models.load(tiny4)[0]
    held_out = samples(tok, ROOT / "resources" / "data" / "calib.txt", 8, 128, seed=12345)  # other windows
    before = _kl(student, teacher, held_out)
    tech = registry.get("distill")
    cfg = tech.make({**FAST, "steps": 40, "hidden_mse": 0.5, "precision": precision})
    info = tech.apply(student, cfg, ctx)
    after = _kl(student, teacher, held_out)
    assert after < 0.7 * before, (before, after)
    assert info["final_loss"] < info["first_loss"]
    assert not checkpoint_dir(ctx, cfg).exists()  # deleted when done
    assert not any(p.requires_grad for p in student.parameters())
    assert any(("bf16 autocast" if precision == "bf16" else "fp32") + " arithmetic" in line for line in lines), lines
    assert all(p.dtype == torch.float32 for p in student.parameters())  # weights stay fp32 either way


def test_distill_after_sparsegpt_2_4_keeps_every_pruned_weight_at_zero(tiny4, home):
    two_of_four = ("sparsegpt", {"pattern": "2:4", "samples": 8, "seq_len": 128})
    model, tok, ctx = _pruned_student(tiny4, "distill-sparse", two_of_four)
    linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    start = {n: m.weight.detach().clone() for n, m in linears.items()}
    zeros = {n: w == 0 for n, w in start.items()}
    teacher = models.load(tiny4)[0]
    held_out = samples(tok, ROOT / "resources" / "data" / "calib.txt", 8, 128, seed=12345)
    before = _kl(model, teacher, held_out)
    tech = registry.get("distill")
    tech.apply(model, tech.make({**FAST, "steps": 30}), ctx)
    assert _kl(model, teacher, held_out) < 0.8 * before  # it did learn ...
    changed = 0
    for n, m in linears.items():  # ... with only the weights sparsegpt kept
        w = m.weight.detach()
        assert (w[zeros[n]] == 0).all(), n
        assert ((w.reshape(-1, 4) != 0).sum(1) <= 2).all(), f"{n}: 2:4 pattern broken"
        changed += int(not torch.equal(w, start[n]))
    assert changed == len(linears)


def test_cancelled_and_resumed_reaches_the_same_final_loss(tiny4, home):
    tech = registry.get("distill")
    cfg = tech.make({**FAST, "steps": 20, "checkpoint_every": 10, "hidden_mse": 0.5})

    student, _, ctx = _pruned_student(tiny4, key="resume")
    whole = tech.apply(student, cfg, ctx)
    whole_w = {n: p.detach().clone() for n, p in student.state_dict().items()}

    student, _, ctx = _pruned_student(tiny4, key="resume")
    ckpt = checkpoint_dir(ctx, cfg) / CKPT_FILE
    ctx._cancelled = lambda: ckpt.is_file()          # cancel right after the checkpoint at step 10
    with pytest.raises(Cancelled):
        tech.apply(student, cfg, ctx)
    assert ckpt.is_file() and torch.load(ckpt, weights_only=False)["step"] == 10

    student, _, ctx = _pruned_student(tiny4, key="resume")  # a fresh process: the model rebuilt
    logs = []
    ctx.log = logs.append
    resumed = tech.apply(student, cfg, ctx)
    assert resumed["resumed_from"] == 10 and any("resuming from the checkpoint at step 10" in t for t in logs)
    assert resumed["losses"][:10] == whole["losses"][:10]
    assert resumed["last_loss"] == pytest.approx(whole["last_loss"], rel=1e-4, abs=1e-6)
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-4, abs=1e-6)
    for n, p in student.state_dict().items():
        assert torch.allclose(p, whole_w[n], atol=1e-5), n
    assert not ckpt.exists()


def test_a_job_streams_loss_lines_progress_with_eta_and_metric_points(tiny4, home, tiny_eval):
    events = []
    spec = JobSpec(model=tiny4, eval=tiny_eval, evaluate=False, recipe={"steps": [
        {"technique": "structured_prune", "layers": 0.5, "ffn": 0.0, "samples": 8, "seq_len": 128},
        {"technique": "distill", **FAST, "steps": 12}]})
    run_job(spec, events.append)
    assert [e["type"] for e in events][-2:] == ["result", "finished"], [e for e in events if e["type"] == "error"]
    lines = [e["text"] for e in events if e["type"] == "log" and e["text"].startswith("distill: step")]
    assert lines and lines[-1].startswith("distill: step 12/12 loss ")
    ticks = [e for e in events if e["type"] == "progress" and "distill: step" in (e.get("note") or "")]
    assert ticks and all("loss" in e["note"] and "ETA" not in e["note"] for e in ticks)  # one ETA, in its field
    assert all(e["step_eta_s"] >= 0 for e in ticks) and ticks[-1]["step_eta_s"] == 0
    pts = [e for e in events if e["type"] == "metric"]
    assert [p["step"] for p in pts] == list(range(1, 13)) and all(p["name"] == "distill_loss" for p in pts)
    steps = events[-2]["payload"]["steps"]
    assert steps[-1]["technique"] == "distill" and len(steps[-1]["losses"]) == 12


def test_a_depth_pruned_student_knows_which_teacher_layer_each_of_its_layers_was(tiny4, home):
    student, _, _ = _pruned_student(tiny4, key="origin")
    origin = [layer.teacher_layer for layer in student.model.layers]
    assert len(origin) == 2 and origin == sorted(set(origin)) and max(origin) < 4


def test_order_rules_and_layer_map():
    r = rc.of(("structured_prune", {"layers": 0.25}), "distill", ("gptq", {"bits": 4}))
    assert [s.name for s in r.steps] == ["structured_prune", "distill", "gptq"]
    with pytest.raises(RecipeError, match="structured_prune → distill → rtn"):
        rc.of("rtn", "distill")
    with pytest.raises(RecipeError, match="cannot follow early_exit"):
        rc.of("early_exit", "distill")
    assert layer_map(2, 4) == [(1, 2), (2, 4)]
    assert layer_map(3, 4)[-1] == (3, 4)
    # after a depth prune each kept layer is matched to itself in the teacher, the last output to the last
    assert layer_map(3, 6, origin=[0, 2, 3]) == [(1, 1), (2, 3), (3, 6)]


def test_the_hidden_state_loss_is_not_all_the_attention_sink():
    # a sink token's states are hundreds of times larger than the others': the loss weighs each token's error
    # relative to its size, as the next layer's RMSNorm sees it, so scaling one token changes nothing
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 6, 16, generator=g)
    s = t + 0.1 * torch.randn(2, 6, 16, generator=g)
    pairs = [(1, 1)]
    loss = float(_hidden_loss([None, s], [None, t], pairs))
    rel = ((s - t) ** 2).mean(-1) / (t ** 2).mean(-1)   # (2, 6): each token's relative squared error
    assert loss == pytest.approx(float(rel.mean()), rel=1e-4)
    s2, t2 = s.clone(), t.clone()
    s2[:, 0] *= 300
    t2[:, 0] *= 300
    assert float(_hidden_loss([None, s2], [None, t2], pairs)) == pytest.approx(loss, rel=1e-4)


def test_listed_by_the_cli_with_full_metadata():
    p = subprocess.run([sys.executable, "-m", "core.cli", "techniques", "--json"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    t = {t["name"]: t for t in json.loads(p.stdout)}["distill"]
    assert t["family"] == "distillation" and t["summary"]
    names = {f["name"] for f in t["fields"]}
    assert {"steps", "lr", "temperature", "seq_len", "batch_size", "hidden_mse", "samples", "calib_text"} <= names
    for f in t["fields"]:
        assert f["help"] and f["default"] is not None
        if f["type"] in ("int", "float") and not f["choices"]:
            assert None not in (f["min"], f["max"], f["step"])


def test_the_window_plots_metric_points_live(qtbot, home, tiny_model, tiny_eval, tmp_path):
    from gui.main_window import MainWindow
    w = MainWindow(model=tiny_model, eval_settings=tiny_eval, auto_baseline=False)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    assert not w.loss_curve.isVisible()
    for i in range(1, 21):  # as the worker's reader thread delivers them
        w.client._dispatch({"type": "metric", "job_id": "x", "name": "distill_loss", "step": i, "value": 3.0 / i})
    assert w.loss_curve.isVisible() and len(w.loss_curve.points) == 20
    assert not w.loss_curve.grab().toImage().isNull()
    # the stage line shows one ETA: the training loop's own, not the job's stage-weighted guess beside it
    w.client._dispatch({"type": "progress", "job_id": "x", "stage": "apply", "fraction": 0.4, "stage_fraction": 0.5,
                        "eta_s": 900.0, "step_eta_s": 75.0, "note": "distill: step 40/80 loss 0.5"})
    line = w.stage_label.toolTip()
    assert "this step: ETA 1 min" in line and line.count("ETA") == 1 and "loss 0.5" in line
    w.loss_curve.clear()
    assert not w.loss_curve.isVisible()


def test_distill_trains_a_low_rank_models_factors_and_keeps_their_shapes(tiny4, home):
    halved = ("low_rank", {"keep": 0.5, "allocation": "uniform", "samples": 8, "seq_len": 128})
    model, _, ctx = _pruned_student(tiny4, "distill-low-rank", halved)
    factors = {n: p.detach().clone() for n, p in model.model.layers.named_parameters() if ".0.weight" in n}
    assert len(factors) == 4 * 7  # every Linear of every layer factored (A of A @ B)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    tech = registry.get("distill")
    info = tech.apply(model, tech.make({**FAST, "steps": 30}), ctx)
    assert info["final_loss"] < 0.95 * info["first_loss"]
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes  # still the factored model
    now = dict(model.model.layers.named_parameters())
    assert all(not torch.equal(now[n], w) for n, w in factors.items())


def test_a_time_budget_plans_fewer_steps_and_still_decays_the_learning_rate(tiny4, home, monkeypatch):
    """On a slow CPU the default 15 minutes must hold: 6 s a step (a fake clock) against a one-minute budget
    leaves room for ~10 of the 80 steps asked, and the schedule is planned over those, not cut off mid-way."""
    from core.techniques import distillation
    clock = [0.0]
    monkeypatch.setattr(distillation, "_now", lambda: clock[0])
    student, _, ctx = _pruned_student(tiny4, key="budget")
    student.model.layers[0].register_forward_pre_hook(lambda *_: clock.__setitem__(0, clock[0] + 6.0))
    lrs, logs = [], []
    ctx.log = logs.append
    real_adamw = distillation._adamw

    def spying_adamw(params, lr):
        opt = real_adamw(params, lr)
        step = opt.step
        opt.step = lambda *a, **k: (lrs.append(opt.param_groups[0]["lr"]), step(*a, **k))[1]
        return opt
    monkeypatch.setattr(distillation, "_adamw", spying_adamw)
    tech = registry.get("distill")
    out = tech.apply(student, tech.make({**FAST, "steps": 80, "minutes": 1.0}), ctx)
    assert 8 <= out["steps"] <= 10 and out["steps_asked"] == 80 and len(out["losses"]) == out["steps"]
    assert any(f"1-minute budget: {out['steps']} of 80 steps fit" in t for t in logs)
    assert any(f"distill: step {out['steps']}/{out['steps']} loss" in t for t in logs)
    assert lrs[-1] < 0.2 * FAST["lr"]  # decayed to near its floor (a tenth) by the planned last step

    # the pace doubles after step 5: the plan follows it down and the run still ends within the budget
    student, _, ctx = _pruned_student(tiny4, key="budget-slower")
    calls = [0]

    def tick(*_):
        calls[0] += 1
        clock[0] += 6.0 if calls[0] <= 5 else 12.0
    student.model.layers[0].register_forward_pre_hook(tick)
    lrs.clear()
    start = clock[0]
    out = tech.apply(student, tech.make({**FAST, "steps": 80, "minutes": 1.0}), ctx)
    assert out["steps"] < 10 and clock[0] - start <= 60.0
    assert lrs[-1] < 0.5 * FAST["lr"]  # well down its decay (a sudden slowdown cuts its last steps)

    # without a budget the steps decide, however slow the steps are
    student, _, ctx = _pruned_student(tiny4, key="no-budget")
    student.model.layers[0].register_forward_pre_hook(lambda *_: clock.__setitem__(0, clock[0] + 6.0))
    assert tech.apply(student, tech.make({**FAST, "steps": 10, "minutes": 0.0}), ctx)["steps"] == 10


def test_a_budgeted_run_cancelled_and_resumed_spends_the_budget_once(tiny4, home, monkeypatch):
    """The checkpoint keeps the plan and the training time spent: the resumed run goes on with what is left of
    the budget, not a fresh 2 minutes."""
    from core.techniques import distillation
    clock = [0.0]
    monkeypatch.setattr(distillation, "_now", lambda: clock[0])
    tech = registry.get("distill")
    cfg = tech.make({**FAST, "steps": 80, "minutes": 2.0, "checkpoint_every": 10})

    student, _, ctx = _pruned_student(tiny4, key="budget-resume")
    student.model.layers[0].register_forward_pre_hook(lambda *_: clock.__setitem__(0, clock[0] + 6.0))
    ckpt = checkpoint_dir(ctx, cfg) / CKPT_FILE
    ctx._cancelled = lambda: ckpt.is_file()  # cancel right after the checkpoint at step 10
    with pytest.raises(Cancelled):
        tech.apply(student, cfg, ctx)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 10 and state["plan"] == 20 and state["seconds"] == pytest.approx(60.0)

    clock[0] += 3600.0  # resumed an hour later
    student, _, ctx = _pruned_student(tiny4, key="budget-resume")
    student.model.layers[0].register_forward_pre_hook(lambda *_: clock.__setitem__(0, clock[0] + 6.0))
    t = clock[0]
    out = tech.apply(student, cfg, ctx)
    assert out["resumed_from"] == 10 and out["steps"] == 20 and clock[0] - t <= 60.0 + 1e-6


def test_distill_trains_on_the_whole_shipped_validation_split_unless_given_a_text(tiny4, home, monkeypatch):
    """Calibration statistics come from the 200 kB slice; distill, which gains from distinct text, draws its
    windows from the whole validation split the app ships (the slice is its beginning)."""
    from core import calibration, paths
    seen = []
    real = calibration.samples
    monkeypatch.setattr(calibration, "samples", lambda tok, text, *a, **k: seen.append(Path(text)) or
                        real(tok, text, *a, **k))
    student, tok, ctx = _pruned_student(tiny4, key="distill-text")
    tech = registry.get("distill")
    tech.apply(student, tech.make({**FAST, "steps": 10}), ctx)
    assert seen[-1] == paths.default_distill_text()
    whole, calib = (p.read_text(encoding="utf-8") for p in (seen[-1], paths.default_calib_text()))
    assert whole.startswith(calib) and len(whole) > 5 * len(calib)
    mine = Path(home) / "mine.txt"
    mine.write_text(calib[:40000], encoding="utf-8")
    student, tok, ctx = _pruned_student(tiny4, key="distill-text-2")
    tech.apply(student, tech.make({**FAST, "steps": 10, "calib_text": str(mine)}), ctx)
    assert seen[-1] == mine
