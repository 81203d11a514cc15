"""``kronc::blocksparse_linear``: ``x @ W.T + bias`` with ``W`` given by its stored ``(bh, bw)`` blocks.

Block ``k`` sits at block-grid position ``(rows[k], cols[k])`` of an ``(out_features, in)`` weight;
``rows`` is sorted ascending (row-major block order, as `SparseIndex.decode` gives it). Missing
blocks cost nothing. The torch implementation is the format's reference (`blocksparse_apply`, one
batched matmul over the stored blocks scattered into the output rows); the Triton kernel walks the
stored blocks of each block row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...reference.blocksparse import blocksparse_apply
from ..backend import use_triton
from ..checks.blocksparse import check_blocksparse
from ..checks.common import (
    OpCtx,
    mark_checked,
    needs_grad,
    transpose_order,
)
from ._registry import kronc_op


def blocksparse_linear_torch(
    x: Tensor, blocks: Tensor, rows: Tensor, cols: Tensor, out_features: int, bias: Tensor | None = None
) -> Tensor:
    y = blocksparse_apply(x, blocks, rows, cols, out_features)
    return y if bias is None else y + bias


@kronc_op
def blocksparse_linear(
    x: Tensor, blocks: Tensor, rows: Tensor, cols: Tensor, out_features: int, bias: Tensor | None = None
) -> Tensor:
    """``x @ W.T + bias`` where ``W``'s block ``(rows[k], cols[k])`` is ``blocks[k]`` and the rest is zero."""
    check_blocksparse("blocksparse_linear", x, blocks, rows, cols, out_features, bias)
    if use_triton("blocksparse_linear", x):
        from ..triton.blocksparse import blocksparse_linear as kernel

        return kernel(x, blocks, rows, cols, out_features, bias)
    return blocksparse_linear_torch(x, blocks, rows, cols, out_features, bias).contiguous()


@blocksparse_linear.register_fake
def _(
    x: Tensor, blocks: Tensor, rows: Tensor, cols: Tensor, out_features: int, bias: Tensor | None = None
) -> Tensor:
    check_blocksparse("blocksparse_linear", x, blocks, rows, cols, out_features, bias)
    return x.new_empty((*x.shape[:-1], out_features))


def _setup(ctx: OpCtx, inputs: tuple, output: Tensor) -> None:
    x, blocks, rows, cols, out_features, _ = inputs
    ctx.save_for_backward(x, blocks, rows, cols)
    ctx.out_features = out_features


def _backward(ctx: OpCtx, g: Tensor) -> tuple[Tensor | None, ...]:
    x, blocks, rows, cols = ctx.saved_tensors
    need = needs_grad(ctx, 6)
    _, bh, bw = blocks.shape
    in_features, out_features = x.shape[-1], ctx.out_features
    gx = gblocks = None
    if need[0]:  # x-grad is the transposed block-sparse product: blocks[k].T at (cols[k], rows[k])
        perm = transpose_order(rows, cols)
        rows_t, cols_t = cols[perm], rows[perm]
        mark_checked(rows_t, in_features // bw, True)
        mark_checked(cols_t, out_features // bh, False)
        blocks_t = blocks[perm].transpose(1, 2)
        gx = torch.ops.kronc.blocksparse_linear(g, blocks_t, rows_t, cols_t, in_features)
    if need[1]:  # d blocks[k] = Σ_t g[t, block row rows[k]]^T x[t, block col cols[k]]
        gs = g.reshape(-1, out_features // bh, bh)[:, rows]  # (T, nnzb, bh)
        xs = x.reshape(-1, in_features // bw, bw)[:, cols]  # (T, nnzb, bw)
        gblocks = torch.bmm(gs.permute(1, 2, 0), xs.transpose(0, 1))
    gb = g.reshape(-1, g.shape[-1]).sum(0) if need[5] else None
    return gx, gblocks, None, None, None, gb


blocksparse_linear.register_autograd(_backward, setup_context=_setup)
