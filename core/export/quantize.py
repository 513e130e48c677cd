"""Weight-only int8 / int4 paths for an exported fp32 ONNX model. Each candidate is a recipe; the
caller verifies every one (perplexity, size, speed) and keeps the one that passes.

Int4 from the engine: a variant quantized by gptq / awq / rtn carries its codes and scales
(`model.squeeze_packed`); each exported MatMul whose weight is exactly such a dequantized tensor
becomes a MatMulNBits node written from those codes, so GPTQ/AWQ quality is kept, not
re-quantized by RTN. fp16 outlier columns ride beside it as a small exact MatMul. MatMuls with no
engine codes (an fp32 variant) fall back to onnxruntime's own 4-bit RTN quantizer, and the
result says so.

Why weight-only: onnxruntime's dynamic int8 (`quantize_dynamic`) also quantizes activations per
tensor, and small LMs have activation outliers: 1.65-1.80x the fp32 perplexity on SmolLM2-135M.
MatMulNBits with 8 bits keeps activations in float and quantizes weights in blocks along K.

Why the embedding matters: in a tied model the token embedding (V, H) is also the LM head
(optimum writes `MatMul(x, Transpose(E))`); the stock quantizer skips that MatMul (its B is not
an initializer) and leaves E in fp32: a fifth of SmolLM2's parameters. Here E is quantized once
in MatMulNBits' layout, (V, k_blocks, block) uint8 = per-row blocks along H, which is exactly
what GatherBlockQuantized (8 bits, quantize_axis = last) reads, so the LM head and the
embedding share one int8 tensor.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXTERNAL_DATA_OVER = 1_800_000_000  # protobuf's 2 GB limit: bigger models keep weights beside


@dataclass(frozen=True)
class Candidate:
    name: str
    method: str                     # weight_only | dynamic
    block_size: int = 32            # weight_only: values per scale along K
    accuracy_level: int = 0         # weight_only: 0 = float compute, 4 = int8 compute (activations in blocks)
    embedding: str = "tied8"        # weight_only: tied8 | int4 | fp32 (how the embedding / LM head is stored)
    per_channel: bool = False       # dynamic
    bits: int = 8                   # weight_only: 8, or 4 (engine codes where the variant has them)
    symmetric: bool = False         # weight_only: the RTN grid onnxruntime's quantizer writes

    def describe(self) -> str:
        if self.bits == 4:
            acc = ", int8 compute" if self.accuracy_level == 4 else ", float compute"
            return (f"MatMulNBits 4-bit from the variant's own codes (else RTN block {self.block_size}){acc}; "
                    "embedding + LM head int8, one shared tensor")
        if self.method == "dynamic":
            return f"quantize_dynamic int8, {'per-channel' if self.per_channel else 'per-tensor'} weights, int8 activations"
        emb = {"tied8": "embedding + LM head int8, one shared tensor",
               "int4": "LM head int8 copy + embedding int4 (stock Gather path)",
               "fp32": "embedding / LM head left in fp32"}[self.embedding]
        acc = ", int8 compute" if self.accuracy_level == 4 else ""
        return f"MatMulNBits 8-bit, block {self.block_size}{acc}; {emb}"


# The export tries all of these and verifies each (see onnx.choose for the pick). On SmolLM2-135M,
# int8 compute (accuracy_level 4) decodes several times faster than float compute at +0.5 % ppl.
CANDIDATES = (
    Candidate("wo8-b64-tied-acc4", "weight_only", 64, 4, "tied8"),
    Candidate("wo8-b32-tied-acc4", "weight_only", 32, 4, "tied8"),
    Candidate("wo8-b32-tied", "weight_only", 32, 0, "tied8"),
)
# Paths measured by bench/export_candidates.py to show why they are not shipped: worse quality
# (padded 128-blocks on H = 576, int8 activations per tensor), or too big (embedding in fp32 or
# stored twice).
REFERENCE_CANDIDATES = (
    Candidate("wo8-b128-tied-acc4", "weight_only", 128, 4, "tied8"),
    Candidate("wo8-b32-emb4", "weight_only", 32, 0, "int4"),
    Candidate("wo8-b32-matmul-only", "weight_only", 32, 0, "fp32"),
    Candidate("dynamic-per-tensor", "dynamic", per_channel=False),
    Candidate("dynamic-per-channel", "dynamic", per_channel=True),
)


# int4: the embedding / LM head stays 8-bit (4-bit RTN on the LM head alone costs several % ppl).
INT4_CANDIDATES = (
    Candidate("wo4-acc4", "weight_only", 32, 4, "tied8", bits=4),
    Candidate("wo4", "weight_only", 32, 0, "tied8", bits=4),
)
CANDIDATES_FOR = {"int8": CANDIDATES, "int4": INT4_CANDIDATES}


def by_name(name: str) -> Candidate:
    for c in CANDIDATES + REFERENCE_CANDIDATES + INT4_CANDIDATES:
        if c.name == name:
            return c
    raise KeyError(name)


def quantize(src: Path, dst: Path, cand: Candidate, packed: dict | None = None) -> dict:
    """fp32 model file `src` -> quantized model file `dst` (plus dst.name + '_data' if large).
    packed: the variant's {param name: QTensor}, used by 4-bit candidates. -> {"engine_matmuls":
    MatMuls written from the engine's codes, "rtn_matmuls": MatMuls quantized by onnxruntime}."""
    import onnx

    if cand.method == "dynamic":
        _dynamic(src, dst, cand)
        return {"engine_matmuls": 0, "rtn_matmuls": None}
    model = onnx.load(str(src))
    if cand.embedding == "tied8":
        _embedding_int8(model, cand)
    elif cand.embedding == "int4":
        _untie_lm_head(model)
    engine, keep = (_from_engine(model, packed or {}, cand) if cand.bits == 4 else (0, []))
    rtn = _weight_matmuls(model.graph, exclude=keep)
    if rtn:
        _matmul_nbits(model, cand, ("MatMul",), bits=cand.bits, exclude=keep)
    if cand.embedding == "int4":
        _matmul_nbits(model, cand, ("Gather",), bits=4)
    from . import graph
    if graph.is_fused(model):  # our own graph: q/k/v and gate/up as one kernel each, now that each has its codes
        graph.fuse_siblings(model)
    save(model, dst)
    return {"engine_matmuls": engine, "rtn_matmuls": rtn}


def save(model, dst: Path) -> None:
    import onnx

    try:
        big = model.ByteSize() > EXTERNAL_DATA_OVER
    except (ValueError, OverflowError):  # past what protobuf can even count
        big = True
    onnx.save_model(model, str(dst), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=dst.name + "_data", size_threshold=1024)


# --------------------------------------------------------------- graph surgery

def _initializers(graph) -> dict:
    return {t.name: t for t in graph.initializer}


def _embedding_gathers(graph):
    """-> [(gather node, initializer name)]: Gathers reading rows of a constant 2-D float table."""
    inits = _initializers(graph)
    out = []
    for n in graph.node:
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            if axis == 0 and inits[n.input[0]].data_type == 1:  # float
                out.append((n, n.input[0]))
    return out


def _tied_heads(graph, name: str):
    """-> [(transpose node, [matmul nodes])] where MatMul(x, Transpose(E)) is the tied LM head."""
    found = []
    for t in graph.node:
        if t.op_type != "Transpose" or t.input[0] != name:
            continue
        perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
        if perm and perm[0] != [1, 0]:
            continue
        users = [m for m in graph.node if m.op_type == "MatMul" and m.input[1] == t.output[0]]
        if users:
            found.append((t, users))
    return found


def _untie_lm_head(model) -> None:
    """Give the tied LM head its own (H, V) initializer, so the stock quantizer treats it as any
    MatMul (and the model stores it twice, quantized)."""
    from onnx import numpy_helper

    g = model.graph
    inits = _initializers(g)
    for _, name in _embedding_gathers(g):
        for t, users in _tied_heads(g, name):
            w = numpy_helper.to_array(inits[name]).T.copy()           # (H, V)
            g.initializer.append(numpy_helper.from_array(w, name + "_lm_head_T"))
            for m in users:
                m.input[1] = name + "_lm_head_T"
            g.node.remove(t)


def _embedding_int8(model, cand: Candidate) -> None:
    """Quantize each embedding table E (V, H) once to uint8 blocks along H, and point both its
    Gather (GatherBlockQuantized) and a tied LM head (MatMulNBits) at that one tensor."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = _initializers(g)
    bs = cand.block_size
    for gather, name in _embedding_gathers(g):
        e = numpy_helper.to_array(inits[name]).astype(np.float32)     # (V, H)
        v, h = e.shape
        q, scales, zp = _block_quant_8bit(e, bs)                      # (V, kb, bs), (V, kb), (V, kb)
        kb = q.shape[1]
        g.initializer.extend([numpy_helper.from_array(q, name + "_Q8"),
                              numpy_helper.from_array(scales, name + "_scales"),
                              numpy_helper.from_array(zp, name + "_zero_points"),
                              numpy_helper.from_array(np.array([v, kb, 1], np.int64), name + "_block_shape"),
                              numpy_helper.from_array(np.array([0, 0, kb * bs], np.int64), name + "_row_shape")])
        # LM head: MatMul(x (.., H), E^T (H, V)) == MatMulNBits(x, E blocks), K = H, N = V
        for t, users in _tied_heads(g, name):
            for m in users:
                acc = {"accuracy_level": cand.accuracy_level} if cand.accuracy_level else {}
                mnb = helper.make_node("MatMulNBits", [m.input[0], name + "_Q8", name + "_scales", name + "_zero_points"],
                                       list(m.output), name=(m.name or name) + "_Q8", domain="com.microsoft",
                                       K=h, N=v, bits=8, block_size=bs, **acc)
                _replace(g, m, [mnb])
            g.node.remove(t)
        # Embedding: rows of (V, kb, bs) blocks; scales / zero points reshaped to (V, kb, 1),
        # which onnxruntime folds once at load (the file keeps one copy).
        p = name + "_gbq"
        nodes = [
            helper.make_node("Reshape", [name + "_scales", name + "_block_shape"], [p + "_scales"], name=p + "_rs_s"),
            helper.make_node("Reshape", [name + "_zero_points", name + "_block_shape"], [p + "_zp"], name=p + "_rs_z"),
            helper.make_node("GatherBlockQuantized", [name + "_Q8", gather.input[1], p + "_scales", p + "_zp"],
                             [p + "_blocks"], name=p, domain="com.microsoft",
                             bits=8, block_size=bs, gather_axis=0, quantize_axis=2),   # (B, T, kb, bs)
            helper.make_node("Reshape", [p + "_blocks", name + "_row_shape"],
                             [gather.output[0] if kb * bs == h else p + "_padded"], name=p + "_rows"),
        ]
        if kb * bs != h:  # the last block was padded: cut back to H
            g.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), p + "_start"),
                                  numpy_helper.from_array(np.array([h], np.int64), p + "_end"),
                                  numpy_helper.from_array(np.array([2], np.int64), p + "_axis")])
            nodes.append(helper.make_node("Slice", [p + "_padded", p + "_start", p + "_end", p + "_axis"],
                                          [gather.output[0]], name=p + "_cut"))
        _replace(g, gather, nodes)
        g.initializer.remove(inits[name])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _replace(graph, node, new_nodes) -> None:
    """Swap `node` for `new_nodes` in place (keeps the topological order)."""
    i = list(graph.node).index(node)
    graph.node.remove(node)
    for k, n in enumerate(new_nodes):
        graph.node.insert(i + k, n)


def _block_quant_8bit(e: np.ndarray, bs: int):
    """Rows of e (N, K) -> MatMulNBits' 8-bit layout: (N, kb, bs) uint8, scales (N, kb), zero
    points (N, kb) uint8; asymmetric, with onnxruntime's own kernel (same rounding as MatMulNBits)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    n, k = e.shape
    kb = -(-k // bs)
    w = np.zeros((kb * bs, n), dtype=np.float32)                     # (K padded, N): B of x @ B
    w[:k] = e.T
    packed = np.zeros((n, kb, bs), dtype=np.uint8)
    scales = np.zeros((n, kb), dtype=np.float32)
    zp = np.zeros((n, kb), dtype=np.uint8)
    quantize_matmul_8bits(packed, w, scales, zp, bs, n, k, False)  # as the stock quantizer calls it
    return packed, scales, zp


# --------------------------------------------------------------- int4 from the engine's codes

NBITS_BLOCKS = (16, 32, 64, 128, 256)  # block sizes MatMulNBits accepts


def _weight_matmuls(graph, exclude=()) -> int:
    """MatMuls whose B is a constant 2-D float initializer (what a weight quantizer rewrites)."""
    inits = _initializers(graph)
    return sum(1 for n in graph.node if n.op_type == "MatMul" and n.name not in exclude
               and n.input[1] in inits and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type == 1)


def _fingerprint(a: np.ndarray) -> str:
    import hashlib
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def _engine_tensors(packed: dict) -> dict:
    """{fingerprint of W^T (K, N) as the exporter writes it: QTensor} for codes MatMulNBits can
    carry: 2-4 bits (4-bit nibbles, the zero point says where the grid sits) or 8 bits (a mixed-precision
    recipe's upgraded Linears), in blocks it accepts."""
    out = {}
    for qt in packed.values():
        if getattr(qt, "kind", None) not in (None, "outliers") or not hasattr(qt, "codes"):
            continue
        if qt.bits not in (2, 3, 4, 8) or qt.group_size not in NBITS_BLOCKS:
            continue
        out[_fingerprint(qt.dequantize().T.numpy())] = qt
    return out


def nbits_arrays(qt) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """QTensor (N=out, K=in) -> MatMulNBits inputs: B (N, kb, bs/2) uint8 for 2-4 bits (element 2j in
    the low nibble) or (N, kb, bs) for 8 bits, scales (N, kb) float32, zero points (N, ceil(kb/2))
    uint8 (4-bit, packed in nibbles) or (N, kb) (8-bit), or None for the symmetric default (8 / 128)."""
    import torch

    from ..packing import unpack_bits
    n, k = qt.shape
    bs = qt.group_size
    kb = -(-k // bs)
    q = unpack_bits(qt.codes, qt.bits, n * k).view(n, k).numpy()
    if qt.symmetric:
        zp = np.full((n, kb), 2 ** (qt.bits - 1), dtype=np.uint8)
    else:
        zp = unpack_bits(qt.zeros, qt.bits, n * kb).view(n, kb).numpy().astype(np.uint8)
    codes = np.repeat(zp, bs, axis=1)                       # padding = the zero point: dequantizes to 0
    codes[:, :k] = q
    codes = codes.reshape(n, kb, bs)
    scales = qt.scales.to(torch.float32).numpy().reshape(n, kb).copy()
    if qt.bits == 8:
        return codes.astype(np.uint8), scales, (None if qt.symmetric else zp)
    b = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    if qt.symmetric and qt.bits == 4:
        return b, scales, None
    zpp = np.zeros((n, kb + kb % 2), dtype=np.uint8)
    zpp[:, :kb] = zp
    return b, scales, (zpp[:, 0::2] | (zpp[:, 1::2] << 4)).astype(np.uint8)


def _from_engine(model, packed: dict, cand: Candidate) -> tuple[int, list[str]]:
    """Rewrites every MatMul whose weight matches one of the engine's low-bit tensors as
    MatMulNBits from those codes (+ an exact MatMul for fp16 outlier columns). -> (count, names
    of the new nodes the RTN pass must leave alone)."""
    from onnx import helper, numpy_helper

    table = _engine_tensors(packed)
    if not table:
        return 0, []
    g = model.graph
    inits = _initializers(g)
    done, keep, used = 0, [], set()
    for m in list(g.node):
        if m.op_type != "MatMul" or m.input[1] not in inits or len(inits[m.input[1]].dims) != 2:
            continue
        init = inits[m.input[1]]
        qt = table.get(_fingerprint(numpy_helper.to_array(init)))
        if qt is None:
            continue
        b, scales, zp = nbits_arrays(qt)
        n, k = qt.shape
        p = f"{m.name or m.output[0]}_Q4"
        g.initializer.extend([numpy_helper.from_array(b, p + "_B"), numpy_helper.from_array(scales, p + "_scales")])
        ins = [m.input[0], p + "_B", p + "_scales"]
        if zp is not None:
            g.initializer.append(numpy_helper.from_array(zp, p + "_zp"))
            ins.append(p + "_zp")
        acc = {"accuracy_level": cand.accuracy_level} if cand.accuracy_level else {}
        cols = list(getattr(qt, "cols", []) or [])
        y = m.output[0] if not cols else p + "_main"
        nodes = [helper.make_node("MatMulNBits", ins, [y], name=p, domain="com.microsoft", K=k, N=n,
                                  bits=8 if qt.bits == 8 else 4,
                                  block_size=qt.group_size, **acc)]
        if cols:  # y += x[..., cols] @ (patch - grid value)^T: exact fp16 columns
            from ..packing import QTensor
            grid = QTensor.dequantize(qt)[:, cols]                                 # (N, k_out)
            delta = (qt.patch.float() - grid).T.contiguous().numpy()               # (k_out, N)
            g.initializer.extend([numpy_helper.from_array(np.array(cols, np.int64), p + "_cols"),
                                  numpy_helper.from_array(delta, p + "_delta")])
            nodes += [helper.make_node("Gather", [m.input[0], p + "_cols"], [p + "_xc"], name=p + "_gather", axis=-1),
                      helper.make_node("MatMul", [p + "_xc", p + "_delta"], [p + "_patch"], name=p + "_patch"),
                      helper.make_node("Add", [y, p + "_patch"], [m.output[0]], name=p + "_add")]
            keep.append(p + "_patch")
        _replace(g, m, nodes)
        used.add(init.name)
        done += 1
    still = {i for n in g.node for i in n.input}
    for name in used - still:  # the fp32 weights now unused
        g.initializer.remove(inits[name])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done, keep


# --------------------------------------------------------------- onnxruntime's quantizers

def _matmul_nbits(model, cand: Candidate, op_types: tuple, bits: int, exclude=()) -> None:
    MatMulNBitsQuantizer = _import_quietly()
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=cand.block_size, is_symmetric=cand.symmetric,
                             accuracy_level=cand.accuracy_level or None, op_types_to_quantize=op_types,
                             nodes_to_exclude=list(exclude),
                             quant_axes=(("MatMul", 0), ("Gather", 1)))
    q.process()  # edits `model` in place


def _dynamic(src: Path, dst: Path, cand: Candidate) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _import_quietly()
    quantize_dynamic(str(src), str(dst), per_channel=cand.per_channel, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gather"], use_external_data_format=False)


def _import_quietly():
    """onnxruntime's quantizer calls logging.basicConfig(level=INFO) on import, which would turn
    on every library's INFO logs in our process; undo that, and keep its per-node chatter off."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization"):
        logging.getLogger(name).setLevel(logging.ERROR)  # e.g. the int4 Gather path's opset-21 note
    return MatMulNBitsQuantizer
