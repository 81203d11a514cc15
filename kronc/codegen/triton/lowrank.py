"""Triton kernel for ``kronc::lowrank_linear``: ``y = (x @ V^T) @ U^T + bias`` in one launch.

Each program owns a block of tokens. It first forms the rank-``r`` intermediate ``h = x V^T`` for
its tokens, entirely on chip (``(tokens, r)``, ``r`` padded to a power of two, at most `MAX_RANK`),
then walks its share of the output features, ``h U^T`` block by block, adding the bias and writing
each block once. The output features are split over ``O_SPLITS`` programs per token block: more
splits give small token counts (decode) parallelism at the price of recomputing ``h`` per split;
the autotuner picks the split per token-count bucket.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks.common import KernelUnavailable
from ..checks.lowrank import check_lowrank
from ._common import autotuned as _autotuned
from ._common import (
    check_device,
    flat_tokens,
    is_interpreted,
    launcher,
    mm,
    next_pow2,
    precision,
    token_bucket,
    upcast,
)

MAX_RANK = 256  # the (tokens, r) intermediate lives in registers; larger ranks use the torch path


@triton.jit
def _lowrank_kernel(
    x_ptr, u_ptr, v_ptr, bias_ptr, y_ptr,
    T, N, OUT, RANK,
    stride_xt, stride_uo, stride_ur, stride_vr, stride_vn, stride_yt,
    T_BUCKET,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BR: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, O_SPLITS: tl.constexpr,
):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    t_ok = offs_t < T
    offs_r = tl.arange(0, BR)
    r_ok = offs_r < RANK
    h = tl.zeros((BT, BR), dtype=tl.float32)
    for k0 in range(0, N, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < N
        xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        vv = tl.load(
            v_ptr + offs_r[None, :] * stride_vr + k[:, None] * stride_vn, mask=k_ok[:, None] & r_ok[None, :], other=0.0
        )
        h = mm(xv, vv, h, PRECISION, UPCAST)
    hq = h.to(x_ptr.dtype.element_ty)  # the reference rounds the intermediate to the input dtype too
    n_blocks = tl.cdiv(OUT, BO)
    per_split = tl.cdiv(n_blocks, O_SPLITS)
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, n_blocks)
    for blk in range(first, last):
        offs_o = blk * BO + tl.arange(0, BO)
        o_ok = offs_o < OUT
        uv = tl.load(
            u_ptr + offs_o[None, :] * stride_uo + offs_r[:, None] * stride_ur, mask=r_ok[:, None] & o_ok[None, :], other=0.0
        )
        acc = mm(hq, uv, tl.zeros((BT, BO), dtype=tl.float32), PRECISION, UPCAST)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + offs_t[:, None] * stride_yt + offs_o[None, :], acc.to(y_ptr.dtype.element_ty),
            mask=t_ok[:, None] & o_ok[None, :],
        )


CONFIGS = [
    triton.Config({"BT": bt, "BK": bk, "BO": bo, "O_SPLITS": s}, num_warps=w, num_stages=st)
    for bt, bk, bo, s, w, st in [
        (16, 64, 64, 32, 4, 2), (16, 64, 128, 16, 4, 2), (16, 128, 64, 8, 4, 3), (32, 64, 64, 4, 4, 2),
        (32, 64, 128, 2, 8, 2), (64, 64, 64, 1, 8, 2), (64, 32, 128, 1, 8, 3), (128, 32, 64, 1, 8, 2),
    ]
]
INTERPRETER_META = {"BT": 16, "BK": 16, "BO": 16, "O_SPLITS": 2}
_tuned = _autotuned(_lowrank_kernel, CONFIGS, key=["T_BUCKET", "N", "OUT", "RANK"])


def lowrank_linear(x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ (u @ v).T + bias`` by the Triton kernel (rank at most `MAX_RANK`)."""
    out_features = check_lowrank("lowrank_linear", x, u, v, bias)
    check_device("lowrank_linear", _lowrank_kernel, x)
    rank, in_features = v.shape
    if rank > MAX_RANK:
        raise KernelUnavailable(f"kronc::lowrank_linear: the Triton kernel keeps rank <= {MAX_RANK} on chip, got {rank}")
    x2 = flat_tokens(x, in_features)
    T = x2.shape[0]
    y = torch.empty(T, out_features, dtype=x.dtype, device=x.device)
    if T and out_features:
        interp = is_interpreted(_lowrank_kernel)
        meta = dict(INTERPRETER_META) if interp else {}

        def grid(m: dict) -> tuple[int, int]:
            return triton.cdiv(T, m["BT"]), m["O_SPLITS"]

        launcher(_lowrank_kernel if interp else _tuned)[grid](
            x2, u, v, bias.contiguous() if bias is not None else x2, y,
            T, in_features, out_features, rank,
            x2.stride(0), *u.stride(), *v.stride(), y.stride(0), token_bucket(T),
            HAS_BIAS=bias is not None, PRECISION=precision(), UPCAST=upcast(_lowrank_kernel, x.dtype),
            BR=next_pow2(rank), **meta,
        )
    return y.reshape(*x.shape[:-1], out_features)
