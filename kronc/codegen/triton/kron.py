"""Triton kernel for ``kronc::kron_linear``: ``y = x @ (Σ_r A_r ⊗ B_r).T + bias`` in one launch.

Each program owns a block of tokens and an output tile ``(p1 block, p2 block)`` of the ``(m1, m2)``
output grid. It loops over the terms and contracts ``x`` (seen as ``(n1, n2)`` per token) with one
factor, keeps that intermediate on chip and contracts it with the other factor into the output
tile (`kron_tile`), then adds the bias and writes the tile once. Which factor goes first follows
the cost model below (the other order is the same kernel on transposed strides). Shapes that do
not divide the tiles are masked.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...reference.kronecker import b_first
from ..checks.kron import check_kron
from ._common import autotuned as _autotuned
from ._common import (
    check_device,
    flat_tokens,
    is_interpreted,
    kron_tile,
    launcher,
    next_pow2,
    precision,
    token_bucket,
    upcast,
)

BQ1_CHUNK = 16  # q1 chunk of the batched-dot path (tl.dot needs K >= 16)
MAX_BP1 = 32  # output rows (p1) per program; larger p1 extents are split across programs


@triton.jit
def _kron_kernel(
    x_ptr, p_ptr, q_ptr, bias_ptr, y_ptr,
    T, R, P1, P2, Q1, Q2,
    stride_xt, stride_xq1, stride_xq2,
    stride_pr, stride_pp1, stride_pq1,
    stride_qr, stride_qp2, stride_qq2,
    stride_yt, stride_yp1, stride_yp2,
    T_BUCKET,
    HAS_BIAS: tl.constexpr, CHUNKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BP1: tl.constexpr, BQ1: tl.constexpr,
    BT: tl.constexpr, BP2: tl.constexpr, BQ2: tl.constexpr,
):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_p1 = tl.program_id(1) * BP1 + tl.arange(0, BP1)
    offs_p2 = tl.program_id(2) * BP2 + tl.arange(0, BP2)
    acc = kron_tile(
        x_ptr, p_ptr, q_ptr, offs_t, offs_p1, offs_p2, T, R, P1, P2, Q1, Q2,
        stride_xt, stride_xq1, stride_xq2, stride_pr, stride_pp1, stride_pq1, stride_qr, stride_qp2, stride_qq2,
        BT, BP1, BP2, BQ1, BQ2, CHUNKED, PRECISION, UPCAST,
    )
    o = offs_p1[None, :, None] * stride_yp1 + offs_p2[None, None, :] * stride_yp2  # flat output feature
    o_mask = (offs_p1 < P1)[None, :, None] & (offs_p2 < P2)[None, None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_mask, other=0.0).to(tl.float32)
    mask = (offs_t < T)[:, None, None] & o_mask
    tl.store(y_ptr + offs_t[:, None, None] * stride_yt + o, acc.to(y_ptr.dtype.element_ty), mask=mask)


CONFIGS = [
    triton.Config({"BT": bt, "BP2": bp2, "BQ2": bq2}, num_warps=w, num_stages=s)
    for bt, bp2, bq2, w, s in [
        (16, 32, 32, 4, 2), (16, 64, 32, 4, 2), (32, 32, 32, 4, 2), (32, 32, 64, 8, 3),
        (64, 32, 32, 8, 2), (16, 16, 64, 4, 3), (64, 64, 32, 8, 2), (128, 32, 32, 8, 2),
    ]
]
INTERPRETER_META = {"BT": 16, "BP2": 16, "BQ2": 16}
_tuned = _autotuned(_kron_kernel, CONFIGS, key=["T_BUCKET", "R", "P1", "P2", "Q1", "Q2"])


def plan_order(m1: int, n1: int, m2: int, n2: int) -> bool:
    """True to contract ``b`` first (``P = a``), False for ``a`` first, by multiply-adds per token.

    Contracting ``Q`` first costs ``Q1*Q2*P2`` per program row of ``P1`` (recomputed for every
    ``p1`` block) and then ``P1*Q1*P2``.
    """

    b_passes = math.ceil(m1 / next_pow2(m1, hi=MAX_BP1))
    a_passes = math.ceil(m2 / next_pow2(m2, hi=MAX_BP1))
    return b_first(m1, n1, m2, n2, b_passes, a_passes)


def launch_kron(
    kernel: object, tuned: object, x2: Tensor, a: Tensor, b: Tensor, bias: Tensor | None, y: Tensor,
    chunked: bool | None = None, b_first: bool | None = None, extra_args: tuple[object, ...] = (),
) -> None:
    """Launch ``kernel`` (``tuned`` on CUDA), the Kronecker kernel or one built on `kron_tile` whose
    signature adds ``extra_args`` after ``T_BUCKET``, for ``y = x2 @ W.T (+ ...)``."""
    (R, m1, n1), (_, m2, n2) = a.shape, b.shape
    T = x2.shape[0]
    if b_first is None:
        b_first = plan_order(m1, n1, m2, n2)
    sxt, sy = x2.stride(0), y.stride(0)
    if b_first:  # P = a, Q = b: Y = A (X B^T)
        p, q, dims = a, b, (m1, m2, n1, n2)
        sx, syp = (n2, 1), (m2, 1)
    else:  # P = b, Q = a: Y^T = B (X^T A^T)
        p, q, dims = b, a, (m2, m1, n2, n1)
        sx, syp = (1, n2), (1, m2)
    P1, P2, Q1, Q2 = dims
    if chunked is None:
        chunked = Q1 >= BQ1_CHUNK
    BP1 = next_pow2(P1, hi=MAX_BP1)
    interp = is_interpreted(kernel)
    meta = dict(INTERPRETER_META) if interp else {}

    def grid(m: dict) -> tuple[int, int, int]:
        return triton.cdiv(T, m["BT"]), triton.cdiv(P1, BP1), triton.cdiv(P2, m["BP2"])

    launcher(kernel if interp else tuned)[grid](
        x2, p, q, bias if bias is not None else x2, y,  # x2: an unread stand-in pointer
        T, R, P1, P2, Q1, Q2,
        sxt, *sx, *p.stride(), *q.stride(), sy, *syp,
        token_bucket(T), *extra_args,
        HAS_BIAS=bias is not None, CHUNKED=chunked, PRECISION=precision(), UPCAST=upcast(kernel, x2.dtype),
        BP1=BP1, BQ1=BQ1_CHUNK, **meta,
    )


def kron_linear(
    x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None = None,
    chunked: bool | None = None, b_first: bool | None = None,
) -> Tensor:
    """``x @ (Σ_r a[r] ⊗ b[r]).T + bias`` by the Triton kernel (float32 accumulation, output in x's dtype).

    ``chunked`` and ``b_first`` override the kernel's own choices (for tests).
    """
    out_features, in_features = check_kron("kron_linear", x, a, b, bias)
    check_device("kron_linear", _kron_kernel, x)
    x2 = flat_tokens(x, in_features)
    y = torch.empty(x2.shape[0], out_features, dtype=x.dtype, device=x.device)
    if x2.shape[0] and out_features:
        bias = None if bias is None else bias.contiguous()
        launch_kron(_kron_kernel, _tuned, x2, a, b, bias, y, chunked, b_first)
    return y.reshape(*x.shape[:-1], out_features)
