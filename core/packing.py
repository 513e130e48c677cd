"""Packed storage of low-bit weights: codes packed into bytes plus fp16 scales (and zeros).

A QTensor is what a quantizer leaves behind for one weight matrix (out, in). It is what gets
written to disk (so the saving is real) and what is dequantized when the variant is loaded back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 values < 2**bits, any shape -> 1-D uint8, ceil(n * bits / 8) bytes."""
    c = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return c.clone()
    if bits in (1, 2, 4):
        per = 8 // bits
        pad = (-c.numel()) % per
        if pad:
            c = torch.cat([c, c.new_zeros(pad)])
        c = c.view(-1, per).to(torch.int32)
        out = torch.zeros(c.shape[0], dtype=torch.int32)
        for i in range(per):
            out |= c[:, i] << (bits * i)
        return out.to(torch.uint8)
    # 3, 5, 6, 7 bits: a little-endian bit stream
    a = c.numpy()
    bitmat = ((a[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(bitmat.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: the first n codes as uint8."""
    p = packed.reshape(-1)
    if bits == 8:
        return p[:n].clone()
    if bits in (1, 2, 4):
        per = 8 // bits
        p32 = p.to(torch.int32)
        mask = (1 << bits) - 1
        parts = [(p32 >> (bits * i)) & mask for i in range(per)]
        return torch.stack(parts, dim=1).reshape(-1)[:n].to(torch.uint8)
    flat = np.unpackbits(p.numpy(), count=n * bits, bitorder="little").reshape(n, bits)
    vals = (flat.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint16)
    return torch.from_numpy(vals.astype(np.uint8))


@dataclass
class QTensor:
    """A (out, in) weight on a `bits`-bit grid, groups of `group_size` along `in`."""

    shape: tuple[int, int]
    bits: int
    group_size: int          # along the input dim; == in_features for per-channel
    symmetric: bool
    codes: torch.Tensor      # packed uint8, 1-D
    scales: torch.Tensor     # (out, G) fp16
    zeros: torch.Tensor | None  # packed uint8 (out*G codes) or None when symmetric

    @property
    def n_groups(self) -> int:
        return math.ceil(self.shape[1] / self.group_size)

    def dequantize(self) -> torch.Tensor:
        out, inp = self.shape
        gs, G = self.group_size, self.n_groups
        q = unpack_bits(self.codes, self.bits, out * inp).view(out, inp).to(torch.float32)
        q = torch.nn.functional.pad(q, (0, G * gs - inp)).view(out, G, gs)
        s = self.scales.to(torch.float32).unsqueeze(-1)
        if self.symmetric:
            w = (q - 2 ** (self.bits - 1)) * s
        else:
            z = unpack_bits(self.zeros, self.bits, out * G).view(out, G, 1).to(torch.float32)
            w = (q - z) * s
        return w.reshape(out, G * gs)[:, :inp].contiguous()

    def theoretical_bytes(self, nonzero: int | None = None) -> float:
        """bits x values / 8 + fp16 scale (and zero) per group; values = non-zeros if given."""
        n = self.shape[0] * self.shape[1] if nonzero is None else nonzero
        groups = self.shape[0] * self.n_groups
        return n * self.bits / 8 + groups * (16 + (0 if self.symmetric else self.bits)) / 8

    # -- on disk: three tensors under the weight's name, plus a small meta dict
    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        t = {f"{name}.qcodes": self.codes, f"{name}.qscales": self.scales}
        if self.zeros is not None:
            t[f"{name}.qzeros"] = self.zeros
        return t

    def meta(self) -> dict:
        return {"shape": list(self.shape), "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric}

    @classmethod
    def from_tensors(cls, name: str, meta: dict, tensors: dict) -> "QTensor":
        if cls is QTensor and meta.get("kind") in KINDS:  # the storage kinds added below
            return KINDS[meta["kind"]].from_tensors(name, meta, tensors)
        return cls(tuple(meta["shape"]), meta["bits"], meta["group_size"], meta["symmetric"],
                   tensors[f"{name}.qcodes"], tensors[f"{name}.qscales"], tensors.get(f"{name}.qzeros"))


def group_shape(inp: int, group_size: int) -> tuple[int, int, int]:
    """(weights per group, groups per row, padding to fill the last group) for rows of `inp` weights;
    group_size <= 0 means one group per row."""
    gs = inp if group_size <= 0 else min(group_size, inp)
    G = math.ceil(inp / gs)
    return gs, G, G * gs - inp


def quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
             scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None) -> QTensor:
    """Round-to-nearest onto a grouped grid. w: (out, in). group_size <= 0 means per-channel.

    A group size that does not divide `in` gets a partial last group (masked, never padded into
    the statistics). Scales are rounded to fp16 *before* the codes are computed, so what is
    stored is exactly what was evaluated. `scales`/`zeros` (out, G) may be given (e.g. by GPTQ).
    """
    w = w.detach().to(torch.float32)
    out, inp = w.shape
    gs, G, pad = group_shape(inp, group_size)
    wg = torch.nn.functional.pad(w, (0, pad)).view(out, G, gs)
    valid = torch.ones(inp + pad, dtype=torch.bool)
    valid[inp:] = False
    valid = valid.view(1, G, gs)
    if scales is None:
        scales, zeros = grid_params(wg, valid, bits, symmetric)
    s = scales.unsqueeze(-1)
    if symmetric:
        half = 2 ** (bits - 1)
        q = torch.clamp(torch.round(wg / s), -half, half - 1) + half
        zq = None
    else:
        q = torch.clamp(torch.round(wg / s) + zeros.unsqueeze(-1), 0, 2 ** bits - 1)
        zq = pack_bits(zeros.to(torch.uint8), bits)
    q = q.view(out, G * gs)[:, :inp].to(torch.uint8)
    return QTensor((out, inp), bits, gs, symmetric, pack_bits(q, bits), scales.to(torch.float16), zq)


def grid_params(wg: torch.Tensor, valid: torch.Tensor, bits: int, symmetric: bool):
    """Per-group fp16-exact scales (and integer zeros). wg: (out, G, gs), valid: (1, G, gs)."""
    if symmetric:
        amax = torch.where(valid, wg.abs(), torch.zeros(())).amax(-1)
        scales = amax / (2 ** (bits - 1) - 1) if bits > 1 else amax
        zeros = None
    else:
        wmax = torch.where(valid, wg, torch.full((), -torch.inf)).amax(-1).clamp(min=0)
        wmin = torch.where(valid, wg, torch.full((), torch.inf)).amin(-1).clamp(max=0)
        scales = (wmax - wmin) / (2 ** bits - 1)
    scales = _fp16_exact(scales)
    if not symmetric:
        zeros = torch.clamp(torch.round(-wmin / scales), 0, 2 ** bits - 1)
    return scales, zeros


def _fp16_exact(s: torch.Tensor) -> torch.Tensor:
    s = s.clamp(min=2.0 ** -14).to(torch.float16).to(torch.float32)  # smallest normal fp16
    return s


def int8_codes(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric per-channel 8-bit QTensor as signed int8 codes (out, in) and scales (out,)."""
    assert qt.bits == 8 and qt.symmetric and qt.n_groups == 1
    out, inp = qt.shape
    q = (unpack_bits(qt.codes, 8, out * inp).view(out, inp).to(torch.int16) - 128).to(torch.int8)
    return q, qt.scales.to(torch.float32).view(out)


# -- Added storage kinds. They reuse the .qcodes/.qscales tensor names (what the variant loader
# drops from the dense state) and say their kind in meta; QTensor.from_tensors dispatches on it.

class NMTensor:
    """A pruned (out, in) weight stored compactly: in every run of `m` input weights only the
    `keep` largest are stored (values in the weight's dtype) with their positions (log2 m bits
    each). Packs the live weight when saved, so later steps that only add zeros stay correct; a
    weight that no longer fits the pattern is stored with every value kept (honest, no saving)."""

    kind = "nm"
    bits = 32          # value bits: no int8 runtime applies
    symmetric = False
    n_groups = 1

    def __init__(self, weight: torch.Tensor | None, keep: int, m: int,
                 values: torch.Tensor | None = None, idx: torch.Tensor | None = None,
                 shape: tuple[int, int] | None = None):
        self.weight, self.keep, self.m = weight, keep, m
        self.shape = tuple(shape or weight.shape)
        self.values, self.idx = values, idx

    def _pack(self):
        if self.values is not None:
            return
        w = self.weight.detach()
        out, inp = w.shape
        if inp % self.m or int((w.reshape(out, -1, self.m) != 0).sum(-1).max()) > self.keep:
            self.keep = self.m = 1  # the pattern does not hold (any more): every value kept
        g = w.reshape(out, -1, self.m)                                       # (out, in/m, m)
        pos = g.abs().topk(self.keep, dim=-1).indices.sort(-1).values        # (out, in/m, keep)
        self.values = g.gather(-1, pos).reshape(out, -1).contiguous()        # (out, in*keep/m)
        self.idx = pack_bits(pos.to(torch.uint8), self._ibits()) if self.m > 1 else torch.zeros(0, dtype=torch.uint8)

    def _ibits(self) -> int:
        return math.ceil(math.log2(self.m))

    def dequantize(self) -> torch.Tensor:
        self._pack()
        out, inp = self.shape
        if self.m == 1:
            return self.values.reshape(out, inp).clone()
        pos = unpack_bits(self.idx, self._ibits(), out * inp // self.m * self.keep).view(out, -1, self.keep).long()
        w = torch.zeros(out, inp // self.m, self.m, dtype=self.values.dtype)
        w.scatter_(-1, pos, self.values.view(out, -1, self.keep))
        return w.reshape(out, inp)

    def theoretical_bytes(self, nonzero: int | None = None) -> float:
        """The ideal: the non-zero values at their bits, no index cost."""
        self._pack()
        n = self.shape[0] * self.shape[1] if nonzero is None else nonzero
        return n * self.values.element_size()

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        self._pack()
        return {f"{name}.qcodes": self.idx, f"{name}.qscales": self.values}

    def meta(self) -> dict:
        self._pack()
        return {"kind": self.kind, "shape": list(self.shape), "keep": self.keep, "m": self.m}

    @classmethod
    def from_tensors(cls, name: str, meta: dict, tensors: dict) -> "NMTensor":
        return cls(None, meta["keep"], meta["m"], tensors[f"{name}.qscales"], tensors[f"{name}.qcodes"],
                   tuple(meta["shape"]))


class CodebookTensor:
    """Weight sharing: each output row (or each group of `group_size` inputs of a row) has a
    codebook of 2**bits fp16 values; every weight is stored as a `bits`-bit index into it."""

    kind = "codebook"
    symmetric = False
    cols: list = []                    # input columns kept in fp16 (outliers)
    patch: torch.Tensor | None = None  # (out, len(cols)) fp16

    def __init__(self, shape, bits: int, group_size: int, codes: torch.Tensor, codebook: torch.Tensor):
        self.shape, self.bits, self.group_size = tuple(shape), bits, group_size
        self.codes, self.codebook = codes, codebook  # packed uint8; (out, G, 2**bits) fp16

    @property
    def n_groups(self) -> int:
        return math.ceil(self.shape[1] / self.group_size)

    @classmethod
    def from_indices(cls, idx: torch.Tensor, codebook: torch.Tensor, bits: int, group_size: int):
        """idx: (out, in) entry numbers; codebook: (out, G, K) values (rounded to fp16 here)."""
        return cls(tuple(idx.shape), bits, group_size, pack_bits(idx.to(torch.uint8), bits),
                   codebook.to(torch.float16))

    def dequantize(self) -> torch.Tensor:
        out, inp = self.shape
        gs, G = self.group_size, self.n_groups
        idx = unpack_bits(self.codes, self.bits, out * inp).view(out, inp).long()
        grp = (torch.arange(inp) // gs).expand(out, inp)                      # (out, in)
        cb = self.codebook.to(torch.float32)                                  # (out, G, K)
        w = cb[torch.arange(out)[:, None], grp, idx]
        if self.cols:
            w[:, self.cols] = self.patch.to(torch.float32)
        return w

    def theoretical_bytes(self, nonzero: int | None = None) -> float:
        n = self.shape[0] * self.shape[1] if nonzero is None else nonzero
        extra = self.patch.numel() * 2 if self.cols else 0
        return n * self.bits / 8 + self.codebook.numel() * 2 + extra

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        t = {f"{name}.qcodes": self.codes, f"{name}.qscales": self.codebook}
        if self.cols:
            t[f"{name}.qpatch"] = self.patch
        return t

    def meta(self) -> dict:
        m = {"kind": self.kind, "shape": list(self.shape), "bits": self.bits, "group_size": self.group_size}
        return {**m, "cols": self.cols} if self.cols else m

    @classmethod
    def from_tensors(cls, name: str, meta: dict, tensors: dict) -> "CodebookTensor":
        ct = cls(tuple(meta["shape"]), meta["bits"], meta["group_size"], tensors[f"{name}.qcodes"],
                 tensors[f"{name}.qscales"])
        if meta.get("cols"):
            ct.cols, ct.patch = [int(c) for c in meta["cols"]], tensors[f"{name}.qpatch"]
        return ct


class ActQTensor(QTensor):
    """An int8 weight whose input is also quantized to int8 at run time with a static,
    calibrated per-tensor scale (W8A8; see techniques/smoothquant.py)."""

    kind = "w8a8"
    act_scale: float = 1.0

    def meta(self) -> dict:
        return {**super().meta(), "kind": self.kind, "act_scale": self.act_scale}

    @classmethod
    def from_tensors(cls, name: str, meta: dict, tensors: dict) -> "ActQTensor":
        qt = cls(tuple(meta["shape"]), meta["bits"], meta["group_size"], meta["symmetric"],
                 tensors[f"{name}.qcodes"], tensors[f"{name}.qscales"], tensors.get(f"{name}.qzeros"))
        qt.act_scale = float(meta["act_scale"])
        return qt


class OutlierQTensor(QTensor):
    """A grouped low-bit weight plus a few input columns kept in fp16 (the columns fed by massive
    activations). The fp16 columns (out, k) ride in the scales tensor after the (out, G) scales;
    their indices are in meta."""

    kind = "outliers"
    cols: list = []
    patch: torch.Tensor | None = None   # (out, k) fp16

    @classmethod
    def of(cls, qt: QTensor, cols: list[int], patch: torch.Tensor) -> "OutlierQTensor":
        o = cls(qt.shape, qt.bits, qt.group_size, qt.symmetric, qt.codes, qt.scales, qt.zeros)
        o.cols, o.patch = [int(c) for c in cols], patch.to(torch.float16)
        return o

    def dequantize(self) -> torch.Tensor:
        w = super().dequantize()
        if self.cols:
            w[:, self.cols] = self.patch.to(torch.float32)
        return w

    def theoretical_bytes(self, nonzero: int | None = None) -> float:
        return super().theoretical_bytes(nonzero) + self.patch.numel() * 2

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        t = super().tensors(name)
        t[f"{name}.qscales"] = torch.cat([self.scales, self.patch], dim=1)
        return t

    def meta(self) -> dict:
        return {**super().meta(), "kind": self.kind, "cols": self.cols}

    @classmethod
    def from_tensors(cls, name: str, meta: dict, tensors: dict) -> "OutlierQTensor":
        both = tensors[f"{name}.qscales"]
        k = len(meta["cols"])
        qt = QTensor(tuple(meta["shape"]), meta["bits"], meta["group_size"], meta["symmetric"],
                     tensors[f"{name}.qcodes"], both[:, :both.shape[1] - k].contiguous(), tensors.get(f"{name}.qzeros"))
        return cls.of(qt, meta["cols"], both[:, both.shape[1] - k:])


KINDS = {c.kind: c for c in (NMTensor, CodebookTensor, ActQTensor, OutlierQTensor)}
