"""Checks of the block-sparse op's inputs: one line naming the op and the shapes (`OpInputError`)."""

from __future__ import annotations

from torch import Tensor

from .common import (
    check_bias,
    check_index,
    check_index_values,
    check_input,
    check_like,
    fail,
    shape,
)


def check_blocksparse(
    op: str, x: Tensor, blocks: Tensor, rows: Tensor, cols: Tensor, out_features: int, bias: Tensor | None
) -> None:
    check_input(op, x)
    if blocks.dim() != 3:
        raise fail(op, f"blocks must be a (nnzb, bh, bw) stack, got shape {shape(blocks)}")
    nnzb, bh, bw = blocks.shape
    in_features = x.shape[-1]
    if bh < 1 or bw < 1 or out_features % bh or in_features % bw:
        raise fail(
            op,
            f"blocks of shape ({bh}, {bw}) do not tile a {out_features}x{in_features} weight "
            f"(x {shape(x)}, out_features={out_features})",
        )
    check_like(op, x, blocks=blocks, bias=bias)
    check_index(op, "rows", rows, x.device)
    check_index(op, "cols", cols, x.device)
    if rows.shape != (nnzb,) or cols.shape != (nnzb,):
        raise fail(op, f"rows {shape(rows)} and cols {shape(cols)} must list one grid position per block ({nnzb})")
    check_index_values(op, "rows", rows, out_features // bh, need_sorted=True)
    check_index_values(op, "cols", cols, in_features // bw)
    check_bias(op, bias, out_features)
