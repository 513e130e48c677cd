"""Knowledge distillation: train the model as the preceding steps left it (the student, e.g. after
`structured_prune` dropped layers) to imitate the model before the recipe (the teacher) on the
whole shipped WikiText-2 validation split (or calib_text), never the evaluation text.

Loss per token: T^2 KL(teacher_T || student_T) on the logits softened by the temperature T, plus,
when `hidden_mse` > 0, that weight times the mean squared error between hidden states (each token's
divided by the teacher state's RMS there, as the next RMSNorm sees it): after
`structured_prune` dropped layers in this job, each kept layer's output matched to its own output in the
teacher, else student layer j to teacher layer round(j * L_teacher / L_student) (skipped when the hidden
sizes differ). The decoder layers and the final norm train; the embedding
and the (tied) LM head stay as they are, which keeps the optimizer state small and the step fast.
Weights that are exactly zero in a Linear of a pruned student (magnitude_prune, wanda, sparsegpt)
stay zero: their mask is re-applied after every update.

The teacher comes from `ctx.base_model`, a loader the job sets (core/jobs/run.py): the model is
reloaded from the job's model id only when a distill step runs, so recipes without distillation
hold no second copy in memory and no other technique changes. Losses stream as `ctx.log` lines
("distill: step i/N loss x"), as progress notes with an ETA, and as numeric points through
`ctx.metric(name, step, value)` when the job provides it (a "metric" event, core/jobs/events.py).

Time budget: with `minutes` > 0 the run times its steps and, where `steps` would overrun the budget at
that pace, plans fewer (the learning-rate schedule follows the planned count, so the run still ends on its
decayed rate); the plan follows the pace as it changes and the run ends within the budget. The same
recipe therefore trains more steps on a faster CPU (bf16 halves a step where the CPU has it): the result
says how many ran.

Checkpoints: every `checkpoint_every` steps the trainable weights, the optimizer state, the step
and the RNG state are written atomically (temp file, then rename) under
cache_dir()/distill/<key>, key = hash of (ctx.state_key, the config, the text); a run that finds one resumes
from it (a cancelled or crashed run goes on where it stopped), and it is deleted when training
completes. The batch order is a function of the step number, so a resumed run sees the same
batches as an uninterrupted one.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

from .base import StepContext, knob
from .gptq import samples_knob, seq_len_knob
from .registry import technique

CKPT_FILE = "state.pt"
PROBE_STEPS = 3  # steps timed (after the first, which pays one-time costs) before the budget plans the run
PACE_STEPS = 10  # the pace a plan assumes: the mean of the last this many steps
_now = time.perf_counter  # (a test's clock replaces it)


@dataclass(frozen=True)
class Distill:
    """Distillation: train the compressed model to imitate the original one (KL on logits, optional hidden-state MSE)."""

    steps: int = knob(80, min=10, max=5000, step=10, unit="steps", scale="log",
                      help="Optimizer steps at most (minutes may plan fewer): 80 take about 5 minutes on 2 CPU cores "
                           "with bf16 arithmetic for a 135M model with a quarter of its layers dropped, about 15 in "
                           "fp32.")
    minutes: float = knob(15.0, min=0.0, max=600.0, step=0.5, unit="min",
                          help="Time budget of the training: where the steps would take longer at the pace of the "
                               "first ones, fewer are planned and the learning rate decays over those; 0 = no "
                               "limit, the steps decide.")
    lr: float = knob(2e-4, min=1e-5, max=1e-2, step=1e-5, unit="", scale="log",
                     help="AdamW learning rate (cosine decay to a tenth of it after a short warm-up). Short runs "
                          "heal more at a higher one: 80 steps after a quarter of the layers were dropped reached "
                          "1.58x fp32 perplexity at 5e-4, 1.67x at 2e-4.")
    temperature: float = knob(1.0, min=0.5, max=8.0, step=0.5, unit="",
                              help="Softens both distributions before the KL; the loss is scaled by T^2.")
    seq_len: int = seq_len_knob(256)
    batch_size: int = knob(4, min=1, max=64, step=1, unit="sequences", help="Calibration windows per step.")
    hidden_mse: float = knob(0.0, min=0.0, max=10.0, step=0.1, unit="",
                             help="Weight of the hidden-state MSE, relative to each token's size (each layer kept by a "
                                  "depth prune matched to itself in the teacher, else layers mapped "
                                  "proportionally); 0 = logits only.")
    samples: int = samples_knob(128)
    calib_text: str = knob("", unit="file", help="Training text file the samples are drawn from; empty = the "
                                                 "shipped WikiText-2 validation split (~280k tokens; never the "
                                                 "evaluation text).")
    checkpoint_every: int = knob(10, min=1, max=1000, step=1, unit="steps", scale="log",
                                 help="Write a checkpoint every this many steps: a cancelled or crashed run "
                                      "resumes from the last one.")
    seed: int = knob(0, min=0, max=2**31 - 1, step=1, help="Seed of the batch order.")
    precision: str = knob("auto", choices=("auto", "bf16", "fp32"),
                          help="Arithmetic of the forward and backward passes (weights and optimizer stay fp32): "
                               "bf16 autocast is ~1.8x faster per step on CPUs with native bf16 (AVX512-BF16 / "
                               "AMX); auto picks it where the CPU has it, fp32 elsewhere.")


def checkpoint_dir(ctx: StepContext, cfg: Distill):
    from .. import paths
    from ..calibration import text_path
    text = text_path(cfg.calib_text, paths.default_distill_text()).name  # which shipped text an empty field meant
    raw = json.dumps([ctx.state_key, asdict(cfg), text], sort_keys=True, default=str)
    key = hashlib.sha256(raw.encode()).hexdigest()[:16]
    return paths.cache_dir() / "distill" / key


def batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """Rows of step `step`: consecutive slices of a per-epoch permutation (a function of the step only)."""
    import torch
    out = []
    pos = step * batch
    while len(out) < batch:
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[i]))
        pos += 1
    return out


def lr_at(step: int, total: int, lr: float) -> float:
    import math
    warm = max(1, min(10, total // 10))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def use_bf16(precision: str) -> bool:
    """bf16 autocast for this run: asked for, or 'auto' on a CPU with native bf16 (where it is not, autocast
    emulates bf16 and is slower than fp32)."""
    import torch
    if precision != "auto":
        return precision == "bf16"
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


KD_ROWS = 8  # tokens per chunk of the loss: 8 x 49,152 fp32 logits = 1.5 MB, in cache (4-16 measured best)
_KD = None  # the loss's torch.autograd.Function, built on first use


def kd_loss(s_logits, t_logits, temperature: float):
    """T^2 * mean over tokens of KL(teacher_T || student_T), differentiable in the student's logits.

    Written by hand (torch has no fused KL-from-logits): the plain expression made ~8 passes over the
    (B, S, V) logits in memory, forward and backward — 200 MB each at 4 x 256 tokens of a 49k vocabulary,
    ~15 % of a distillation step on a 2-core CPU. Here each chunk of KD_ROWS tokens is done while in cache
    and the gradient, T/N * (softmax(s/T) - softmax(t/T)), is computed with the loss."""
    global _KD
    if _KD is None:  # built on first use: importing this module must not import torch
        _KD = _kd_class()
    return _KD.apply(s_logits, t_logits.detach(), float(temperature))


def _kd_class():
    import torch

    class KD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s_logits, t_logits, T):
            v = s_logits.shape[-1]
            s2, t2 = s_logits.detach().reshape(-1, v), t_logits.reshape(-1, v)  # (N, V)
            n = s2.shape[0]
            grad = torch.empty(s2.shape, dtype=s_logits.dtype) if s_logits.requires_grad else None
            total = torch.zeros((), dtype=torch.float64)
            for i in range(0, n, KD_ROWS):
                ls = torch.log_softmax(s2[i:i + KD_ROWS].float() / T, -1)
                lt = torch.log_softmax(t2[i:i + KD_ROWS].float() / T, -1)
                pt = lt.exp()
                total += (pt * (lt - ls)).sum(dtype=torch.float64)
                if grad is not None:
                    grad[i:i + KD_ROWS] = ls.exp_().sub_(pt).mul_(T / n)
            ctx.save_for_backward(grad if grad is not None else torch.empty(0))
            ctx.shape = s_logits.shape
            return (total * (T * T / n)).float()

        @staticmethod
        def backward(ctx, g):
            (grad,) = ctx.saved_tensors
            if g.numel() == 1 and float(g) == 1.0:  # the usual case: spare another pass over the logits
                return grad.reshape(ctx.shape), None, None
            return (grad * g).reshape(ctx.shape), None, None

    return KD


def layer_map(n_student: int, n_teacher: int, origin: list[int] | None = None) -> list[tuple[int, int]]:
    """(student hidden-state index, teacher index) pairs (index 0 = embeddings; the last, both models' normed
    output). `origin`: the teacher layer each student layer was (structured_prune keeps whole layers): each
    kept layer's output is matched to its own in the teacher; else layers are matched proportionally."""
    if origin is not None and len(origin) == n_student and max(origin, default=-1) < n_teacher:
        return [(j, origin[j - 1] + 1) for j in range(1, n_student)] + [(n_student, n_teacher)]
    return [(j, round(j * n_teacher / n_student)) for j in range(1, n_student + 1)]


def relative_mse(s, t):
    """MSE between hidden states (B, S, H), each token's pair divided by the target state's RMS: every consumer
    of the residual stream normalizes it per token first (RMSNorm), and unscaled the loss is all the
    attention-sink tokens' massive activations (hundreds, against ~1 elsewhere)."""
    import torch
    t = t.float()
    inv = t.pow(2).mean(-1, keepdim=True).add_(1e-6).rsqrt_()  # (B, S, 1)
    return torch.nn.functional.mse_loss(s.float() * inv, t * inv)


def _hidden_loss(s_hidden, t_hidden, pairs):
    """Mean over the (student, teacher) layer pairs of their relative_mse."""
    import torch
    return torch.stack([relative_mse(s_hidden[j], t_hidden[k]) for j, k in pairs]).mean()


def _trainable(model):
    frozen = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        frozen.add(id(head.weight))
    return [(n, p) for n, p in model.named_parameters() if id(p) not in frozen]


def _adamw(params, lr: float):
    """AdamW, its fused CPU kernel where this torch has one (3x faster a step than the per-tensor loop:
    0.42 -> 0.13 s for SmolLM2's decoder on 2 cores)."""
    import torch
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _save_atomic(obj, folder) -> None:
    import torch
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{CKPT_FILE}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, folder / CKPT_FILE)


@technique(Distill, name="distill", family="distillation")
def distill(model, cfg: Distill, ctx: StepContext) -> dict:
    import shutil

    import torch

    from .. import paths
    from ..calibration import samples, text_path
    from ..errors import DataError

    if ctx.tokenizer is None:
        raise DataError("distill needs the model's tokenizer for its training text")
    load_teacher = getattr(ctx, "base_model", None)
    if load_teacher is None:
        raise DataError("distill needs the model before the recipe (the teacher); this job does not provide it")
    ids = samples(ctx.tokenizer, text_path(cfg.calib_text, paths.default_distill_text()), cfg.samples, cfg.seq_len,
                  seed=cfg.seed)
    ctx.progress(0.0, "loading the teacher")
    teacher = load_teacher()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    ctx.check_cancel()

    n_s, n_t = model.config.num_hidden_layers, teacher.config.num_hidden_layers
    use_hidden = cfg.hidden_mse > 0
    if use_hidden and model.config.hidden_size != teacher.config.hidden_size:
        ctx.log(f"distill: hidden sizes differ ({model.config.hidden_size} vs {teacher.config.hidden_size}); "
                "hidden-state MSE off")
        use_hidden = False
    origin = [getattr(layer, "teacher_layer", None) for layer in model.model.layers]
    pairs = layer_map(n_s, n_t, None if None in origin else origin) if use_hidden else []

    params = _trainable(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    masks = {n: (p != 0) for n, p in params
             if p.dim() == 2 and (p == 0).float().mean().item() >= 0.01}  # pruned weights stay zero
    opt = _adamw([p for _, p in params], cfg.lr)

    folder = checkpoint_dir(ctx, cfg)
    start, losses = 0, []
    plan, planned, spent_before = cfg.steps, False, 0.0  # planned: the budget has set the plan once
    ck = folder / CKPT_FILE
    if ck.is_file():
        try:
            state = torch.load(ck, map_location="cpu", weights_only=False)
            named = dict(params)
            if set(state["weights"]) != set(named) or any(
                    state["weights"][n].shape != named[n].shape for n in named):
                raise ValueError("the checkpoint's shapes differ from this model's")
            with torch.no_grad():
                for n, p in params:
                    p.copy_(state["weights"][n])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            start, losses = int(state["step"]), list(state["losses"])
            plan, planned = int(state.get("plan", cfg.steps)), bool(state.get("planned", False))
            spent_before = float(state.get("seconds", 0.0))
            ctx.log(f"distill: resuming from the checkpoint at step {start}/{plan}")
        except Exception as e:  # a damaged or stale checkpoint: start over
            ctx.log(f"distill: checkpoint not usable ({type(e).__name__}: {e}); starting from step 0")
            start, losses = 0, []
            plan, planned, spent_before = cfg.steps, False, 0.0
            opt = _adamw([p for _, p in params], cfg.lr)
    else:
        torch.manual_seed(cfg.seed)

    # Cancel lands within a layer's forward, not only between steps.
    hooks = [layer.register_forward_pre_hook(lambda *_: ctx.check_cancel()) for layer in model.model.layers]
    metric = getattr(ctx, "metric", None)
    was_training = model.training
    model.train()
    t0, done_here = _now(), 0
    ends = collections.deque(maxlen=PACE_STEPS + 1)  # when each of the recent steps ended
    budget = cfg.minutes * 60.0
    every_log = max(1, min(10, cfg.steps // 20))
    bf16 = use_bf16(cfg.precision)
    ctx.log(f"distill: {'bf16 autocast' if bf16 else 'fp32'} arithmetic")
    try:
        with torch.enable_grad():
            step = start
            while step < plan:
                ctx.check_cancel()
                batch = ids[batch_indices(step, len(ids), cfg.batch_size, cfg.seed)]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    with torch.no_grad():
                        t_out = teacher(batch, output_hidden_states=use_hidden, use_cache=False)
                    s_out = model(batch, output_hidden_states=use_hidden, use_cache=False)
                loss = kd_loss(s_out.logits, t_out.logits, cfg.temperature)  # in fp32 (kd_loss casts)
                if use_hidden:
                    loss = loss + cfg.hidden_mse * _hidden_loss(s_out.hidden_states, t_out.hidden_states, pairs)
                del t_out
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, plan, cfg.lr)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if masks:
                    with torch.no_grad():
                        for n, p in params:
                            if n in masks:
                                p.mul_(masks[n])
                value = float(loss.detach())
                losses.append(value)
                done_here += 1
                step = i = step + 1
                now = _now()
                # the pace: over the last PACE_STEPS steps, from the end of the first (which pays one-time costs)
                ends.append(now)
                per_step = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else now - t0
                if budget > 0 and done_here > PROBE_STEPS:
                    # planned at that pace, and re-planned when it moves (a neighbour's load, a slower phase) by a
                    # few %: the cosine schedule shifts a little and still ends at its floor
                    left = budget - spent_before - (now - t0)
                    fit = max(i, min(cfg.steps, i + int(left // per_step)))
                    if fit != plan and (not planned or fit == i or abs(fit - plan) >= max(2, plan // 20)):
                        plan, planned = fit, True
                        ctx.log(f"distill: budget spent at step {i}" if fit == i else
                                f"distill: {cfg.minutes:g}-minute budget: {plan} of {cfg.steps} steps fit at "
                                f"{per_step:.1f} s a step; the learning rate decays over {plan}")
                eta = per_step * (plan - i)
                if metric is not None:
                    metric("distill_loss", i, value)
                if i % every_log == 0 or i == plan or i == start + 1:
                    ctx.log(f"distill: step {i}/{plan} loss {value:.4f}")
                ctx.progress(i / plan, f"step {i}/{plan} loss {value:.4f}", eta_s=eta)
                if i % cfg.checkpoint_every == 0 and i < plan:
                    _save_atomic({"weights": {n: p.detach().clone() for n, p in params},
                                  "optimizer": opt.state_dict(), "step": i, "losses": losses,
                                  "plan": plan, "planned": planned, "seconds": spent_before + now - t0,
                                  "rng": torch.get_rng_state(), "config": asdict(cfg)}, folder)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(False)
    del teacher, opt
    shutil.rmtree(folder, ignore_errors=True)
    tail = losses[-max(1, min(10, len(losses))):]
    return {"steps": len(losses), "steps_asked": cfg.steps, "minutes": cfg.minutes, "resumed_from": start,
            "first_loss": round(losses[0], 5) if losses else None,
            "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
            "last_loss": round(losses[-1], 5) if losses else None,
            "losses": [round(v, 5) for v in losses],
            "seconds_per_step": round((_now() - t0) / max(1, done_here), 3)}
