"""A Llama model written straight to an onnxruntime-fused ONNX graph.

Why not only optimum-onnx: its traced Llama graph runs ~3,000 small ops per decoded token (causal
mask, position and rotary arithmetic, shape ops rebuilt at every step), and on a 2-core CPU that
framework overhead, not the weights, bounds decode speed (bench/RESULTS.md, "issue-6-status").
onnxruntime ships fused kernels for exactly this block: GroupQueryAttention (causal attention with
rotary embedding and the KV cache append in one op) and SkipSimplifiedLayerNormalization (residual
add + RMSNorm). No kept library writes them for transformers 4.57 (onnxruntime-genai's builder needs
transformers >= 5), so this module does, for Llama models whose every layer is the plain Llama block;
anything else goes through optimum-onnx as before (export_onnx decides).

The graph keeps optimum's contract, so the verification, the quantizers and generate.py use it
unchanged:
  inputs   input_ids (B, T) int64, attention_mask (B, P+T) int64,
           past_key_values.{i}.key / .value (B, kv_heads_i, P, head_dim) float32
  outputs  logits (B, T, V), present.{i}.key / .value (B, kv_heads_i, P+T, head_dim)
smoothquant's W8A8 Linears are written as what they compute: QuantizeLinear of the input on its
static calibrated scale, then MatMulIntegerToFloat with the variant's int8 weights (per-row scales).
Every other weight is a MatMul with B = W^T (K, N) as an initializer, and a tied LM head is
MatMul(x, Transpose(E)) on the embedding table, as optimum writes them: the int8 / int4 rewrites
(core/export/quantize.py) find them the same way. Batches are unpadded (the app feeds batch 1 with
an all-ones mask): GroupQueryAttention reads each row's length from the mask.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

OPSET = 17
MIN_OPSET = 13     # ReduceSum with its axes as an input
MS = "com.microsoft"


def supported(model) -> str | None:
    """None when `model` can be written by this module, else why not (one line)."""
    import torch.nn as nn

    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":  # (Mistral / Qwen2 blocks match, but untested)
        return f"model type {getattr(cfg, 'model_type', None)!r}: the fused writer takes Llama models"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} is not SiLU"
    if getattr(model, "squeeze_kv_cache", None):
        return "a KV-cache technique is attached; the fused graph keeps a full float cache"
    for name, mod in model.named_modules():  # early exit & co. replace a forward or hook into it
        if "forward" in vars(mod) or mod._forward_hooks or mod._forward_pre_hooks:
            return f"{name or 'the model'} has a replaced forward or a forward hook (a technique changes how it runs)"
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head % 16:
        return f"head size {head} is not a multiple of 16 (onnxruntime's GroupQueryAttention needs that)"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not isinstance(getattr(model, "lm_head", None), nn.Linear):
        return "no decoder layers / LM head where a Llama keeps them"
    for i, layer in enumerate(layers):
        at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = [(at, "q_proj"), (at, "k_proj"), (at, "v_proj"), (at, "o_proj"),
                 (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")]
        if at is None or mlp is None or type(layer).forward is not type(layers[0]).forward:
            return f"layer {i} is not a plain decoder layer"
        if not all(type(getattr(m, n, None)) is nn.Linear or _w8a8(getattr(m, n, None)) for m, n in names):
            return f"layer {i} has a projection that is not a plain Linear (factored, routed or wrapped)"
        if type(mlp).__name__ != "LlamaMLP" or type(at).__name__ != "LlamaAttention":
            return f"layer {i} has a modified attention or MLP block ({type(at).__name__}, {type(mlp).__name__})"
    rope = getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear", "llama3", "yarn"):
        return "rope scaling that changes with the length is not handled"  # the fused tables are fixed
    return None


def build(model, folder: Path, opset: int | None = None) -> Path:
    """Writes folder/model.onnx (+ config) for `model` (float32, eval mode). -> the model file."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    cfg = model.config
    inner = model.model
    h = cfg.hidden_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
    nodes, inits = [], []

    def init(name: str, a: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.array(a, order="C"), name))  # (ascontiguousarray makes 0-d 1-d)
        return name

    def node(op: str, ins: list[str], outs: list[str], domain: str = "", **attrs):
        nodes.append(helper.make_node(op, ins, outs, name=outs[0] + "_" + op if outs[0] else op + str(len(nodes)),
                                      domain=domain, **attrs))
        return outs

    def w(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(torch.float32).numpy()

    quantized_inputs: dict = {}  # (input, activation scale) -> (int8 input, scale, zero point): q/k/v share one

    def linear(x: str, mod, name: str) -> str:
        if _w8a8(mod):  # smoothquant: int8 weights per output channel, the input on its static int8 grid
            a = float(mod.act_scale)
            if (x, a) not in quantized_inputs:
                # uint8 with zero point 128, not int8: onnxruntime's x86 integer GEMM is u8 x s8 (measured at
                # M = 1: 38 GB/s of weights, s8 x s8 2.3 GB/s); the grid is the same symmetric one
                scale_in, zp_in = init(name + ".a_scale", np.float32(a)), init(name + ".a_zp", np.uint8(128))
                xq = node("QuantizeLinear", [x, scale_in, zp_in], [name + "_xq"])[0]
                quantized_inputs[(x, a)] = xq, scale_in, zp_in
            xq, scale_in, zp_in = quantized_inputs[(x, a)]
            codes, scales = _int8_rows(mod.weight, getattr(model, "squeeze_packed", {}).get(name + ".weight"))
            return node("MatMulIntegerToFloat", [xq, init(name + ".weight_int8_T", codes.T), scale_in,
                                                 init(name + ".w_scale", scales), zp_in], [name], domain=MS)[0]
        y = node("MatMul", [x, init(name + ".weight_T", w(mod.weight).T)], [name])[0]   # (.., K) @ (K, N)
        if mod.bias is not None:
            y = node("Add", [y, init(name + ".bias", w(mod.bias))], [name + "_b"])[0]
        return y

    # Rotary tables (P, D/2) for every position the model knows, computed in the graph from the
    # rotary module's own frequencies (its rope type's scaling already applied) as HF computes
    # them: cos(pos * inv_freq) * attention_scaling. Only constants feed them, so onnxruntime folds
    # them once at load and the file keeps D/2 floats instead of two tables.
    max_pos = int(getattr(cfg, "max_position_embeddings", 4096))
    rot = inner.rotary_emb
    node("Range", [init("rope_start", np.array(0, np.int64)), init("rope_len", np.array(max_pos, np.int64)),
                   init("rope_step", np.array(1, np.int64))], ["rope_pos64"])
    node("Cast", ["rope_pos64"], ["rope_pos_f"], to=TensorProto.FLOAT)
    node("Unsqueeze", ["rope_pos_f", init("axis1", np.array([1], np.int64))], ["rope_pos"])      # (P, 1)
    # (P, 1) * (1, D/2) by broadcasting, not MatMul: the weight quantizers rewrite every MatMul on a constant
    node("Mul", ["rope_pos", init("rope_inv_freq", w(rot.inv_freq)[None, :])], ["rope_freqs"])    # (P, D/2)
    scale = float(getattr(rot, "attention_scaling", 1.0))
    cos_name, sin_name = "cos_cache", "sin_cache"
    for op, name in (("Cos", cos_name), ("Sin", sin_name)):
        if scale == 1.0:
            node(op, ["rope_freqs"], [name])
        else:
            node(op, ["rope_freqs"], [name + "_unscaled"])
            node("Mul", [name + "_unscaled", init("rope_scaling", np.array(scale, np.float32))], [name])

    # Each row's length from the mask: GroupQueryAttention wants (total - 1) per row and the total.
    one = init("one_i64", np.array(1, np.int64))
    node("ReduceSum", ["attention_mask", "axis1"], ["mask_len"], keepdims=0)
    node("Sub", ["mask_len", one], ["seqlens_m1"])
    node("Cast", ["seqlens_m1"], ["seqlens_k"], to=TensorProto.INT32)
    node("Shape", ["attention_mask"], ["mask_shape"])
    node("Gather", ["mask_shape", one], ["total_len64"], axis=0)
    node("Cast", ["total_len64"], ["total_len"], to=TensorProto.INT32)

    emb = inner.embed_tokens.weight
    tied = model.lm_head.weight.data_ptr() == emb.data_ptr()
    table = init("model.embed_tokens.weight", w(emb))                                  # (V, H)
    x = node("Gather", [table, "input_ids"], ["inputs_embeds"], axis=0)[0]             # (B, T, H)

    graph_in = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                              ["batch_size", "past_sequence_length + sequence_length"])]
    graph_out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length",
                                                                             cfg.vocab_size])]
    presents = []
    residual, pending = x, None            # pending: a block's output not yet added to the residual
    for i, layer in enumerate(inner.layers):
        p = f"model.layers.{i}"
        at, mlp = layer.self_attn, layer.mlp
        nq, nkv = at.q_proj.out_features // d, at.k_proj.out_features // d
        normed, residual = _rms(node, init, w, layer.input_layernorm, residual, pending, eps, p + ".input_norm")
        q, k, v = (linear(normed, getattr(at, n), f"{p}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj"))
        pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        ok, ov = f"present.{i}.key", f"present.{i}.value"
        for name in (pk, pv):
            graph_in.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                          ["batch_size", nkv, "past_sequence_length", d]))
        for name in (ok, ov):
            presents.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                          ["batch_size", nkv, "total_sequence_length", d]))
        attn = node("GroupQueryAttention", [q, k, v, pk, pv, "seqlens_k", "total_len", cos_name, sin_name],
                    [f"{p}.attn", ok, ov], domain=MS, num_heads=nq, kv_num_heads=nkv, do_rotary=1,
                    rotary_interleaved=0, scale=float(getattr(at, "scaling", d ** -0.5)))[0]
        o = linear(attn, at.o_proj, f"{p}.self_attn.o_proj")
        normed, residual = _rms(node, init, w, layer.post_attention_layernorm, residual, o, eps, p + ".post_norm")
        gate = linear(normed, mlp.gate_proj, f"{p}.mlp.gate_proj")
        up = linear(normed, mlp.up_proj, f"{p}.mlp.up_proj")
        sig = node("Sigmoid", [gate], [f"{p}.mlp.sigmoid"])[0]
        act = node("Mul", [gate, sig], [f"{p}.mlp.silu"])[0]
        prod = node("Mul", [act, up], [f"{p}.mlp.prod"])[0]
        pending = linear(prod, mlp.down_proj, f"{p}.mlp.down_proj")
    normed, _ = _rms(node, init, w, inner.norm, residual, pending, eps, "model.norm")
    if tied:
        node("Transpose", [table], ["lm_head_T"], perm=[1, 0])
        node("MatMul", [normed, "lm_head_T"], ["logits"])
    else:
        head = node("MatMul", [normed, init("lm_head.weight_T", w(model.lm_head.weight).T)], ["logits_nb"])[0]
        if model.lm_head.bias is not None:
            node("Add", [head, init("lm_head.bias", w(model.lm_head.bias))], ["logits"])
        else:
            nodes[-1].output[0] = "logits"
    graph = helper.make_graph(nodes, "squeeze-llama", graph_in, graph_out + presents, initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset or OPSET), helper.make_opsetid(MS, 1)],
                          producer_name="squeeze-studio")
    m.ir_version = 8
    from .ort_runner import SHARED_KV_KEY
    helper.set_model_props(m, {SHARED_KV_KEY: "1"})  # GroupQueryAttention can decode in place
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "model.onnx"
    from .quantize import save
    save(m, out)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    return out


def _w8a8(mod) -> bool:
    from ..techniques.smoothquant import W8A8Linear
    return isinstance(mod, W8A8Linear)


def _int8_rows(weight, qt) -> tuple[np.ndarray, np.ndarray]:
    """(out, in) weight on a per-row symmetric int8 grid -> codes (out, in) int8, scales (out,) float32.
    From the variant's stored codes when it has them, else read back off the grid (max |code| = 127)."""
    import torch
    if qt is not None and qt.bits == 8 and qt.symmetric and qt.group_size in (0, qt.shape[1]):
        from ..packing import unpack_bits
        n, k = qt.shape
        codes = unpack_bits(qt.codes, 8, n * k).view(n, k).to(torch.int16) - 128
        return codes.to(torch.int8).numpy(), qt.scales.to(torch.float32).reshape(n).numpy()
    wt = weight.detach().to(torch.float32)
    scales = (wt.abs().amax(1) / 127).clamp(min=1e-12)
    return torch.round(wt / scales[:, None]).clamp(-127, 127).to(torch.int8).numpy(), scales.numpy()


def _rms(node, init, w, norm, residual: str, add: str | None, eps: float, name: str) -> tuple[str, str]:
    """RMSNorm of residual (+ add): -> (normed, the new residual). One fused op either way."""
    gamma = init(name + ".weight", w(norm.weight))
    if add is None:
        return node("SimplifiedLayerNormalization", [residual, gamma], [name], axis=-1, epsilon=eps)[0], residual
    outs = node("SkipSimplifiedLayerNormalization", [add, residual, gamma], [name, "", "", name + "_sum"],
                domain=MS, epsilon=eps)
    return outs[0], outs[3]


# --------------------------------------------------------------- sibling projections as one

def is_fused(model) -> bool:
    return any(n.op_type == "GroupQueryAttention" for n in model.graph.node)


def fuse_file(path: Path) -> int:
    """fuse_siblings on a model file, rewritten in place."""
    import onnx

    from .quantize import save
    m = onnx.load(str(path))
    n = fuse_siblings(m)
    if n:
        for p in Path(path).parent.glob(Path(path).name + "_data"):
            p.unlink()
        save(m, Path(path))
    return n


def fuse_siblings(model) -> int:
    """Projections that read the same input (q/k/v; gate/up) become one wider MatMul (fp32 weights
    concatenated along N), MatMulNBits (codes, scales and zero points concatenated along N) or
    MatMulIntegerToFloat (W8A8: int8 weights and their column scales along N, one input scale) and
    a Split back to the original outputs: fewer, larger kernels per decoded token. Run after the
    weight quantizers (they match each projection's own weight). -> projections merged."""
    from onnx import helper, numpy_helper

    from .quantize import _initializers, _replace
    g = model.graph
    inits = _initializers(g)
    made_by = {o: n for n in g.node for o in n.output}
    read_by: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            read_by.setdefault(x, []).append(n)
    groups: dict[tuple, list] = {}
    for n in g.node:
        key = _fusable(n, inits)
        if key is not None:
            groups.setdefault(key, []).append(n)
    merged = 0
    for key, nodes in groups.items():
        if len(nodes) < 2:
            continue
        arrays = [_weights(n, inits) for n in nodes]                  # per node: [B, scales, zp] along N
        widths = [a[-1] for a in arrays]
        name = nodes[0].name + "_fused"
        ins = [nodes[0].input[0]]
        if key[0] == "MatMulIntegerToFloat":  # int8 B (K, N) and its per-column scales; one input scale
            ins += [_const(g, name + "_B", np.concatenate([a[0] for a in arrays], axis=1)), nodes[0].input[2],
                    _const(g, name + "_scales", np.concatenate([a[1] for a in arrays])), nodes[0].input[4]]
        else:
            for j in range(len(arrays[0]) - 1):
                cat = np.concatenate([a[j] for a in arrays], axis=1 if key[0] == "MatMul" else 0)
                part = f"{name}_" + (("weight_T",) if key[0] == "MatMul" else ("B", "scales", "zero_points"))[j]
                ins.append(_const(g, part, cat))
        attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
        if key[0] == "MatMulNBits":
            attrs["N"] = sum(widths)
        y = name + "_y"
        new = [helper.make_node(key[0], ins, [y], name=name, domain=nodes[0].domain, **attrs)]
        outs = [n.output[0] for n in nodes]
        patches = [_patch(n, inits, made_by, read_by) for n in nodes]
        if any(patches):  # the exact fp16 columns of each: one Gather, one MatMul, one Add for the group
            # siblings read the same input and usually keep the same input columns exact (chosen
            # from its statistics): their union, so shared columns cost one row, not one per sibling
            own = [numpy_helper.to_array(inits[p[2].input[1]]).astype(np.int64) if p else None for p in patches]
            cols = np.unique(np.concatenate([c for c in own if c is not None]))
            row = {int(c): r for r, c in enumerate(cols)}
            delta = np.zeros((len(cols), sum(widths)), np.float32)          # (union, N): block j at its N
            c = 0
            for k, (p, wdt) in enumerate(zip(patches, widths)):
                if p:
                    d = numpy_helper.to_array(inits[p[1].input[1]])          # (k_j, N_j)
                    delta[[row[int(x)] for x in own[k]], c:c + wdt] = d
                    outs[k] = p[0].output[0]
                    for old in p:
                        g.node.remove(old)
                c += wdt
            new += [helper.make_node("Gather", [ins[0], _const(g, name + "_cols", cols)],
                                     [name + "_xc"], name=name + "_gather", axis=-1),
                    helper.make_node("MatMul", [name + "_xc", _const(g, name + "_delta", delta)], [name + "_patch"],
                                     name=name + "_patch"),
                    helper.make_node("Add", [y, name + "_patch"], [name + "_sum"], name=name + "_add")]
            y = name + "_sum"
        gqa = [u for u in read_by.get(outs[0], []) if u.op_type == "GroupQueryAttention"]
        if len(outs) == 3 and gqa and list(gqa[0].input[:3]) == outs:
            gqa[0].input[0], gqa[0].input[1], gqa[0].input[2] = y, "", ""  # takes q/k/v packed: no Split
        else:
            new.append(helper.make_node("Split", [y, _const(g, name + "_widths", np.array(widths, np.int64))], outs,
                                        name=name + "_split", axis=-1))
        _replace(g, nodes[0], new)  # where the first sibling was: every input is defined by then
        for n in nodes[1:]:
            g.node.remove(n)
        merged += len(nodes)
    used = {x for n in g.node for x in n.input}
    for t in list(g.initializer):
        if t.name not in used:
            g.initializer.remove(t)
    return merged


def _patch(n, inits, made_by, read_by) -> tuple | None:
    """(Add, MatMul, Gather) when the node's output only feeds Add(y, Gather(x, cols) @ delta) on the
    same input x: the exact outlier columns written beside a MatMulNBits (quantize._from_engine)."""
    users = read_by.get(n.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    other = add.input[1] if add.input[0] == n.output[0] else add.input[0]
    mm = made_by.get(other)
    if mm is None or mm.op_type != "MatMul" or mm.input[1] not in inits:
        return None
    ga = made_by.get(mm.input[0])
    if ga is None or ga.op_type != "Gather" or ga.input[0] != n.input[0] or ga.input[1] not in inits:
        return None
    return add, mm, ga


def _fusable(n, inits) -> tuple | None:
    """Grouping key of a projection that can be merged with its siblings, or None."""
    from onnx import helper
    if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2 \
            and inits[n.input[1]].data_type == 1:
        return ("MatMul", n.input[0], inits[n.input[1]].dims[0])
    if n.op_type == "MatMulNBits" and all(x in inits for x in n.input[1:]) and len(n.input) in (3, 4):
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        return ("MatMulNBits", n.input[0], a["K"], a["bits"], a["block_size"], a.get("accuracy_level", 0),
                len(n.input))
    if n.op_type == "MatMulIntegerToFloat" and len(n.input) == 5 and n.input[1] in inits and n.input[3] in inits:
        return ("MatMulIntegerToFloat", n.input[0], n.input[2], n.input[4], inits[n.input[1]].dims[0])  # same input
    return None


def _weights(n, inits) -> list:
    """The node's constant inputs, each with N as its first axis (MatMul: B (K, N), N on axis 1), then N."""
    from onnx import helper, numpy_helper
    if n.op_type == "MatMulIntegerToFloat":  # B (K, N), per-column scales (N,)
        b, sc = numpy_helper.to_array(inits[n.input[1]]), numpy_helper.to_array(inits[n.input[3]])
        return [b, sc, b.shape[1]]
    arrs = [numpy_helper.to_array(inits[x]) for x in n.input[1:]]
    if n.op_type == "MatMul":
        return [arrs[0], arrs[0].shape[1]]
    width = {x.name: helper.get_attribute_value(x) for x in n.attribute}["N"]
    out = [arrs[0]]
    for a in arrs[1:]:  # scales / zero points: (N, x) or flat (N * x)
        out.append(a.reshape(width, -1) if a.ndim == 1 else a)
    return out + [width]


def _const(g, name: str, a: np.ndarray) -> str:
    from onnx import numpy_helper
    g.initializer.append(numpy_helper.from_array(a, name))
    return name
