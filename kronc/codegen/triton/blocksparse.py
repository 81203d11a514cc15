"""Triton kernel for ``kronc::blocksparse_linear``: ``y = x @ W.T + bias`` over the stored blocks only.

Each program owns a block of tokens and (a slice of) one block row of ``W``; it walks that block
row's stored blocks (compressed rows from the sorted block-row indices), multiplying the matching
input slice by each block, and writes its output slice once. Missing blocks are never touched.
Blocks of any shape are masked up to the next power of two (at least 16, as ``tl.dot`` needs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks.blocksparse import check_blocksparse
from ._common import autotuned as _autotuned
from ._common import (
    check_device,
    csr_pointers,
    flat_tokens,
    is_interpreted,
    launcher,
    mm,
    next_pow2,
    precision,
    token_bucket,
    upcast,
)

MAX_BH = 128  # output rows of one block handled per program; taller blocks are split over programs


@triton.jit
def _blocksparse_kernel(
    x_ptr, blk_ptr, crow_ptr, col_ptr, bias_ptr, y_ptr,
    T, BH_, BW_,
    stride_xt, stride_yt, stride_bk, stride_bh, stride_bw,
    T_BUCKET,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BH: tl.constexpr,
    BT: tl.constexpr, BW: tl.constexpr,
):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    block_row = tl.program_id(1)
    offs_h = tl.program_id(2) * BH + tl.arange(0, BH)
    t_ok = offs_t < T
    h_ok = offs_h < BH_
    start = tl.load(crow_ptr + block_row)
    end = tl.load(crow_ptr + block_row + 1)
    acc = tl.zeros((BT, BH), dtype=tl.float32)
    for e in range(start, end):
        c = tl.load(col_ptr + e)
        for w0 in range(0, BW_, BW):
            w = w0 + tl.arange(0, BW)
            w_ok = w < BW_
            xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + c * BW_ + w[None, :], mask=t_ok[:, None] & w_ok[None, :], other=0.0)
            bv = tl.load(
                blk_ptr + e * stride_bk + offs_h[None, :] * stride_bh + w[:, None] * stride_bw,
                mask=w_ok[:, None] & h_ok[None, :], other=0.0,
            )
            acc = mm(xv, bv, acc, PRECISION, UPCAST)
    o = block_row * BH_ + offs_h
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * stride_yt + o[None, :], acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & h_ok[None, :])


CONFIGS = [
    triton.Config({"BT": bt, "BW": bw}, num_warps=w, num_stages=s)
    for bt, bw, w, s in [(16, 32, 4, 2), (16, 64, 4, 3), (32, 32, 4, 2), (32, 64, 4, 3), (64, 32, 8, 2), (128, 32, 8, 2)]
]
INTERPRETER_META = {"BT": 16, "BW": 16}
_tuned = _autotuned(_blocksparse_kernel, CONFIGS, key=["T_BUCKET", "BH_", "BW_"])


def blocksparse_linear(
    x: Tensor, blocks: Tensor, rows: Tensor, cols: Tensor, out_features: int, bias: Tensor | None = None
) -> Tensor:
    """``x @ W.T + bias`` from the stored ``(bh, bw)`` blocks at grid positions ``(rows, cols)`` (rows sorted)."""
    check_blocksparse("blocksparse_linear", x, blocks, rows, cols, out_features, bias)
    check_device("blocksparse_linear", _blocksparse_kernel, x)
    _, bh, bw = blocks.shape
    x2 = flat_tokens(x, x.shape[-1])
    T = x2.shape[0]
    y = torch.empty(T, out_features, dtype=x.dtype, device=x.device)
    if T and out_features:
        crow = csr_pointers(rows, out_features // bh)
        BH = next_pow2(bh, hi=MAX_BH)
        interp = is_interpreted(_blocksparse_kernel)
        meta = dict(INTERPRETER_META) if interp else {}

        def grid(m: dict) -> tuple[int, int, int]:
            return triton.cdiv(T, m["BT"]), out_features // bh, triton.cdiv(bh, BH)

        launcher(_blocksparse_kernel if interp else _tuned)[grid](
            x2, blocks, crow, cols.contiguous(), bias.contiguous() if bias is not None else x2, y,
            T, bh, bw, x2.stride(0), y.stride(0), *blocks.stride(), token_bucket(T),
            HAS_BIAS=bias is not None, PRECISION=precision(), UPCAST=upcast(_blocksparse_kernel, x.dtype),
            BH=BH, **meta,
        )
    return y.reshape(*x.shape[:-1], out_features)
