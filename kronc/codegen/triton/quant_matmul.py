"""Triton kernel for ``kronc::quant_linear``: ``y = x @ dequant(W).T + bias`` with the weight
dequantized inside the matmul (int8, int4, int2; group or per-row scales; symmetric or with minima).

Each program owns a ``(BT tokens, BO outputs)`` tile and walks the input dimension ``BK`` columns at
a time: it loads the packed bytes of the ``(BO, BK)`` weight tile (byte ``k // (8 / bits)``, bit
offset ``(k % (8 / bits)) * bits``, the layout of `kronc.reference.pack`), turns them into levels,
multiplies by the group's fp16 scale (group ``k // group_size``) and adds the group minimum, casts
the tile to the activation dtype (as the reference decodes to ``x``'s dtype) and accumulates
``x_tile @ w_tile.T`` in float32. The dense weight never exists in memory; the packed bytes are
read once per token tile. int3 (values straddle bytes) takes the torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import KernelUnavailable
from ..checks.quant import check_quant, level_offset
from ._common import autotuned as _autotuned
from ._common import check_device, flat_tokens, is_interpreted, launcher, mm, precision, token_bucket, upcast

BITS = (8, 4, 2)


@triton.jit
def _quant_kernel(
    x_ptr, c_ptr, s_ptr, m_ptr, bias_ptr, y_ptr,
    T, N, OUT, GS,
    stride_xt, stride_co, stride_so, stride_yt,
    T_BUCKET,
    BITS: tl.constexpr, LO: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
):
    VPB: tl.constexpr = 8 // BITS  # values per byte
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_o = tl.program_id(1) * BO + tl.arange(0, BO)
    t_ok, o_ok = offs_t < T, offs_o < OUT
    acc = tl.zeros((BT, BO), dtype=tl.float32)
    for k0 in range(0, N, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < N
        xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        wmask = k_ok[:, None] & o_ok[None, :]  # the weight tile is held transposed, (BK, BO)
        byte = tl.load(c_ptr + offs_o[None, :] * stride_co + (k // VPB)[:, None], mask=wmask, other=0)
        if BITS == 8:
            q = byte.to(tl.int32) + (0 if LO < 0 else LO + 128)
        else:
            shift = ((k % VPB) * BITS)[:, None]
            q = ((byte.to(tl.int32) >> shift) & ((1 << BITS) - 1)) + LO
        g = (k // GS)[:, None]
        sc = tl.load(s_ptr + offs_o[None, :] * stride_so + g, mask=wmask, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * sc
        if HAS_MIN:
            w += tl.load(m_ptr + offs_o[None, :] * stride_so + g, mask=wmask, other=0.0).to(tl.float32)
        w = tl.where(wmask, w, 0.0).to(x_ptr.dtype.element_ty)
        acc = mm(xv, w, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_o[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & o_ok[None, :])


CONFIGS = [
    triton.Config({"BT": bt, "BK": bk, "BO": bo}, num_warps=w, num_stages=st)
    for bt, bk, bo, w, st in [
        (16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (16, 64, 128, 4, 2), (32, 64, 64, 4, 3),
        (64, 64, 64, 4, 3), (64, 32, 128, 8, 3), (128, 64, 64, 8, 3), (128, 32, 128, 8, 2),
    ]
]
INTERPRETER_META = {"BT": 16, "BK": 16, "BO": 16}
_tuned = _autotuned(_quant_kernel, CONFIGS, key=["T_BUCKET", "N", "OUT", "GS", "BITS"])


def quant_linear(x: Tensor, codes: Tensor, scales: Tensor, minima: Tensor | None, bias: Tensor | None,
                 bits: int) -> Tensor:
    """``x @ dequant(codes, scales, minima).T + bias`` by the Triton kernel (int8, int4, int2)."""
    out_features, group = check_quant("quant_linear", x, codes, scales, minima, bias, bits)
    check_device("quant_linear", _quant_kernel, x)
    if bits not in BITS:
        raise KernelUnavailable(f"kronc::quant_linear: the Triton kernel takes {list(BITS)}-bit weights, not {bits}")
    in_features = x.shape[-1]
    x2 = flat_tokens(x, in_features)
    T = x2.shape[0]
    y = torch.empty(T, out_features, dtype=x.dtype, device=x.device)
    if T and out_features:
        interp = is_interpreted(_quant_kernel)
        meta = dict(INTERPRETER_META) if interp else {}
        codes, scales = codes.contiguous(), scales.contiguous()
        mins = minima.contiguous() if minima is not None else scales

        def grid(m: dict) -> tuple[int, int]:
            return triton.cdiv(T, m["BT"]), triton.cdiv(out_features, m["BO"])

        launcher(_quant_kernel if interp else _tuned)[grid](
            x2, codes, scales, mins, bias.contiguous() if bias is not None else x2, y,
            T, in_features, out_features, group,
            x2.stride(0), codes.stride(0), scales.stride(0), y.stride(0), token_bucket(T),
            BITS=bits, LO=level_offset(bits, minima is None), HAS_MIN=minima is not None,
            HAS_BIAS=bias is not None, PRECISION=precision(), UPCAST=upcast(_quant_kernel, x.dtype), **meta,
        )
    return y.reshape(*x.shape[:-1], out_features)
