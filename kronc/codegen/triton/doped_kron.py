"""Triton kernel for ``kronc::doped_kron_linear``: ``y = x @ (Σ_r A_r ⊗ B_r + S).T + bias`` in one launch.

The Kronecker part is the tile of `kron.py` (`kron_tile`, intermediate on chip); before the tile is
written, the sparse overlay ``S`` is added from compressed rows: each output feature of the tile
walks its own stored entries (`csr_overlay`), gathering the matching inputs of the tile's tokens.
The output is written once; no second launch or read-modify-write pass for the overlay.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks.doped import check_doped
from ._common import autotuned as _autotuned
from ._common import check_device, csr_overlay, csr_pointers, flat_tokens, kron_tile
from .kron import CONFIGS, launch_kron


@triton.jit
def _doped_kron_kernel(
    x_ptr, p_ptr, q_ptr, bias_ptr, y_ptr,
    T, R, P1, P2, Q1, Q2,
    stride_xt, stride_xq1, stride_xq2,
    stride_pr, stride_pp1, stride_pq1,
    stride_qr, stride_qp2, stride_qq2,
    stride_yt, stride_yp1, stride_yp2,
    T_BUCKET,
    crow_ptr, col_ptr, val_ptr,
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
    t_mask = (offs_t < T)[:, None, None]
    acc = csr_overlay(acc, x_ptr, stride_xt, offs_t[:, None, None], t_mask, o, o_mask, crow_ptr, col_ptr, val_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_t[:, None, None] * stride_yt + o, acc.to(y_ptr.dtype.element_ty), mask=t_mask & o_mask)


_tuned = _autotuned(_doped_kron_kernel, CONFIGS, key=["T_BUCKET", "R", "P1", "P2", "Q1", "Q2"])


def doped_kron_linear(
    x: Tensor, a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, values: Tensor, bias: Tensor | None = None,
    chunked: bool | None = None, b_first: bool | None = None,
) -> Tensor:
    """``x @ (Σ_r a[r] ⊗ b[r] + S).T + bias`` by the fused Triton kernel; ``rows`` sorted ascending."""
    out_features = check_doped("doped_kron_linear", x, a, b, rows, cols, values, bias)
    check_device("doped_kron_linear", _doped_kron_kernel, x)
    x2 = flat_tokens(x, x.shape[-1])
    y = torch.empty(x2.shape[0], out_features, dtype=x.dtype, device=x.device)
    if x2.shape[0] and out_features:
        crow = csr_pointers(rows, out_features)
        extra = (crow, cols.contiguous(), values.contiguous())
        bias = None if bias is None else bias.contiguous()
        launch_kron(_doped_kron_kernel, _tuned, x2, a, b, bias, y, chunked, b_first, extra_args=extra)
    return y.reshape(*x.shape[:-1], out_features)
