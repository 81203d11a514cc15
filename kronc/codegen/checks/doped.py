"""Checks of the doped Kronecker op's inputs: one line naming the op and the shapes (`OpInputError`)."""

from __future__ import annotations

from torch import Tensor

from .common import (
    check_like,
)
from .kron import check_kron
from .sparse import check_entries


def check_doped(
    op: str, x: Tensor, a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, values: Tensor, bias: Tensor | None
) -> int:
    out_features, _ = check_kron(op, x, a, b, bias)
    check_like(op, x, values=values)
    check_entries(op, x, rows, cols, values, out_features)
    return out_features
