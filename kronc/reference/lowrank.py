"""Low rank ``W = U V`` applied through the rank-``r`` intermediate."""

from __future__ import annotations

from torch import Tensor


def lowrank_apply(x: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``x @ (u @ v).T`` as two thin matmuls through the rank-``r`` intermediate (reference)."""
    return (x @ v.T) @ u.T
