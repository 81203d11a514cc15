"""Checks of Kronecker ops' inputs (``kron_linear``, ``kron_embedding``): one line naming the op and the shapes (`OpInputError`)."""

from __future__ import annotations

from torch import Tensor

from .common import (
    check_bias,
    check_features,
    check_index,
    check_index_values,
    check_input,
    check_like,
    fail,
    shape,
)


def check_factors(op: str, a: Tensor, b: Tensor) -> None:
    if a.dim() != 3 or b.dim() != 3:
        raise fail(op, f"a and b must be (terms, m, n) stacks, got a {shape(a)} and b {shape(b)}")
    if a.shape[0] != b.shape[0]:
        raise fail(op, f"a has {a.shape[0]} terms but b has {b.shape[0]} (a {shape(a)}, b {shape(b)})")
    if not a.is_floating_point():
        raise fail(op, f"a and b must be floating point, got {a.dtype}")
    if a.device != b.device or a.dtype != b.dtype:
        raise fail(op, f"a ({a.dtype}, {a.device}) and b ({b.dtype}, {b.device}) must share dtype and device")


def check_kron(op: str, x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None) -> tuple[int, int]:
    """Validate a Kronecker linear; returns ``(out_features, in_features)``."""
    check_input(op, x)
    check_factors(op, a, b)
    (_, m1, n1), (_, m2, n2) = a.shape, b.shape
    check_features(op, x, n1 * n2, f"a {shape(a)} ⊗ b {shape(b)} (n1*n2 = {n1}*{n2})")
    check_like(op, x, a=a, b=b, bias=bias)
    check_bias(op, bias, m1 * m2)
    return m1 * m2, n1 * n2


def check_kron_embedding(op: str, index: Tensor, a: Tensor, b: Tensor) -> tuple[int, int]:
    """Validate a Kronecker row lookup; returns ``(rows, row length)`` of the table."""
    check_factors(op, a, b)
    check_index(op, "index", index, a.device, dim=None)
    (_, m1, n1), (_, m2, n2) = a.shape, b.shape
    check_index_values(op, "index", index, m1 * m2)
    return m1 * m2, n1 * n2
