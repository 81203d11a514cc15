"""Triton kernel for ``kronc::sparse_linear``: ``y = x @ S.T + bias`` for a sparse ``S`` in compressed rows.

Each program owns a block of tokens and a block of output features; every feature walks its own
stored entries (`csr_overlay`) and gathers the matching inputs. Rows must be sorted (row-major
entries); the row pointers come from ``searchsorted`` so their shape is static.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks.sparse import check_sparse
from ._common import autotuned as _autotuned
from ._common import (
    check_device,
    csr_overlay,
    csr_pointers,
    flat_tokens,
    is_interpreted,
    launcher,
    token_bucket,
)


@triton.jit
def _sparse_kernel(
    x_ptr, crow_ptr, col_ptr, val_ptr, bias_ptr, y_ptr,
    T, OUT, stride_xt, stride_yt, T_BUCKET,
    HAS_BIAS: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr,
):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_o = tl.program_id(1) * BO + tl.arange(0, BO)
    t_mask = (offs_t < T)[:, None]
    o_mask = (offs_o < OUT)[None, :]
    acc = tl.zeros((BT, BO), dtype=tl.float32)
    acc = csr_overlay(acc, x_ptr, stride_xt, offs_t[:, None], t_mask, offs_o[None, :], o_mask, crow_ptr, col_ptr, val_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o[None, :], mask=o_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_o[None, :], acc.to(y_ptr.dtype.element_ty), mask=t_mask & o_mask)


CONFIGS = [
    triton.Config({"BT": bt, "BO": bo}, num_warps=w)
    for bt, bo, w in [(1, 128, 4), (4, 64, 4), (16, 32, 4), (16, 64, 4), (32, 64, 8), (64, 32, 8)]
]
INTERPRETER_META = {"BT": 4, "BO": 8}
_tuned = _autotuned(_sparse_kernel, CONFIGS, key=["T_BUCKET", "OUT"])


def sparse_linear(
    x: Tensor, rows: Tensor, cols: Tensor, values: Tensor, out_features: int, bias: Tensor | None = None
) -> Tensor:
    """``x @ S.T + bias``, ``S[rows[k], cols[k]] = values[k]``, by the Triton kernel (rows sorted)."""
    check_sparse("sparse_linear", x, rows, cols, values, out_features, bias)
    check_device("sparse_linear", _sparse_kernel, x)
    x2 = flat_tokens(x, x.shape[-1])
    T = x2.shape[0]
    y = torch.empty(T, out_features, dtype=x.dtype, device=x.device)
    if T and out_features:
        crow = csr_pointers(rows, out_features)
        interp = is_interpreted(_sparse_kernel)
        meta = dict(INTERPRETER_META) if interp else {}

        def grid(m: dict) -> tuple[int, int]:
            return triton.cdiv(T, m["BT"]), triton.cdiv(out_features, m["BO"])

        launcher(_sparse_kernel if interp else _tuned)[grid](
            x2, crow, cols.contiguous(), values.contiguous(), bias.contiguous() if bias is not None else x2, y,
            T, out_features, x2.stride(0), y.stride(0), token_bucket(T),
            HAS_BIAS=bias is not None, **meta,
        )
    return y.reshape(*x.shape[:-1], out_features)
