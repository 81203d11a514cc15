"""Checks of the low-rank op's inputs: one line naming the op and the shapes (`OpInputError`)."""

from __future__ import annotations

from torch import Tensor

from .common import (
    check_bias,
    check_features,
    check_input,
    check_like,
    fail,
    shape,
)


def check_lowrank(op: str, x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None) -> int:
    """Validate a low-rank linear; returns ``out_features``."""
    check_input(op, x)
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
        raise fail(op, f"u must be (out, r) and v (r, in) with one rank r, got u {shape(u)} and v {shape(v)}")
    check_features(op, x, v.shape[1], f"v {shape(v)}")
    check_like(op, x, u=u, v=v, bias=bias)
    check_bias(op, bias, u.shape[0])
    return u.shape[0]
