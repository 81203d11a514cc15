"""Checks of the sparse-overlay op's inputs: one line naming the op and the shapes (`OpInputError`)."""

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


def check_entries(op: str, x: Tensor, rows: Tensor, cols: Tensor, values: Tensor, out_features: int) -> None:
    """``(rows, cols, values)`` are matching 1-D entry lists of an ``(out_features, x.shape[-1])`` matrix."""
    check_index(op, "rows", rows, x.device)
    check_index(op, "cols", cols, x.device)
    if values.dim() != 1 or rows.shape != values.shape or cols.shape != values.shape:
        raise fail(
            op, f"rows {shape(rows)}, cols {shape(cols)} and values {shape(values)} must be 1-D of one length"
        )
    if out_features < 0:
        raise fail(op, f"out_features must be >= 0, got {out_features}")
    check_index_values(op, "rows", rows, out_features, need_sorted=True)
    check_index_values(op, "cols", cols, x.shape[-1])


def check_sparse(
    op: str, x: Tensor, rows: Tensor, cols: Tensor, values: Tensor, out_features: int, bias: Tensor | None
) -> None:
    check_input(op, x)
    check_like(op, x, values=values, bias=bias)
    check_entries(op, x, rows, cols, values, out_features)
    check_bias(op, bias, out_features)
