"""Kronecker sums ``W = Σ_r A_r ⊗ B_r`` applied without building ``W``, and the rule for which factor
to contract first (the one place it is written: the format's FLOP count, the torch op, its gradients,
the Triton kernel and the planner's estimates all ask `contraction_costs`)."""

from __future__ import annotations

import torch
from torch import Tensor


def contraction_costs(m1: int, n1: int, m2: int, n2: int, b_passes: int = 1, a_passes: int = 1) -> tuple[int, int]:
    """Multiply-adds per token of ``Y = A X Bᵀ`` (``A`` ``(m1, n1)``, ``B`` ``(m2, n2)``, ``X`` ``(n1, n2)``), one term,
    contracted ``b`` first (``X Bᵀ`` then ``A ·``) and ``a`` first (``A X`` then ``· Bᵀ``).

    ``b_passes`` / ``a_passes``: how many times the first product is recomputed (a tiled kernel that
    redoes it per output tile); 1 for a plain GEMM.
    """
    return m2 * n1 * n2 * b_passes + m1 * n1 * m2, m1 * n1 * n2 * a_passes + m1 * n2 * m2


def b_first(m1: int, n1: int, m2: int, n2: int, b_passes: int = 1, a_passes: int = 1) -> bool:
    """Whether contracting ``b`` first costs no more than ``a`` first (ties go to ``b``)."""
    b_cost, a_cost = contraction_costs(m1, n1, m2, n2, b_passes, a_passes)
    return b_cost <= a_cost


def rearrange(weight: Tensor, a_shape: tuple[int, int]) -> Tensor:
    """Van Loan–Pitsianis rearrangement: row ``(i1, j1)`` is the flattened ``(i1, j1)`` block."""
    (m, n), (m1, n1) = weight.shape, a_shape
    m2, n2 = m // m1, n // n1
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def unrearrange(r: Tensor, shape: tuple[int, int], a_shape: tuple[int, int]) -> Tensor:
    """Inverse of `kronecker.rearrange`."""
    (m, n), (m1, n1) = shape, a_shape
    m2, n2 = m // m1, n // n1
    return r.reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m, n)


def kron_times(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """``(a ⊗ b) @ x`` for ``x`` of shape ``(n1 n2, c)`` without building the Kronecker product."""
    (m1, n1), (m2, n2), c = a.shape, b.shape, x.shape[1]
    x3 = x.reshape(n1, n2, c)
    if b_first(m1, n1, m2, n2):
        t = torch.matmul(b, x3)  # (n1, m2, c)
        return (a @ t.reshape(n1, m2 * c)).reshape(m1 * m2, c)
    t = (a @ x3.reshape(n1, n2 * c)).reshape(m1, n2, c)
    return torch.matmul(b, t).reshape(m1 * m2, c)


def kronecker_apply(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``x @ (Σ_r a[r] ⊗ b[r]).T`` as two matmuls on ``x`` reshaped to ``(n1, n2)`` (reference).

    Whichever factor costs fewer FLOPs goes first; each contraction is one GEMM over all tokens
    and terms (no factor is broadcast per token).
    """
    terms, m1, n1 = a.shape
    _, m2, n2 = b.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n1 * n2)
    t = x2.shape[0]
    if b_first(m1, n1, m2, n2):
        z = x2.reshape(t * n1, n2) @ b.reshape(terms * m2, n2).T  # Z[t, j1, r, i2] = (X_t B_r^T)[j1, i2]
        z = z.reshape(t, n1, terms, m2).permute(0, 3, 2, 1).reshape(t * m2, terms * n1)
        y = (z @ a.permute(0, 2, 1).reshape(terms * n1, m1)).reshape(t, m2, m1).transpose(1, 2)  # (T, m1, m2)
    else:
        xt = x2.reshape(t, n1, n2).transpose(1, 2).reshape(t * n2, n1)
        z = xt @ a.reshape(terms * m1, n1).T  # Z[t, j2, r, i1] = (A_r X_t)[i1, j2]
        z = z.reshape(t, n2, terms, m1).permute(0, 3, 2, 1).reshape(t * m1, terms * n2)
        y = z @ b.permute(0, 2, 1).reshape(terms * n2, m2)  # (T*m1, m2)
    return y.reshape(*lead, m1 * m2)


def kronecker_rows(index: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Rows ``index`` of ``Σ_r a[r] ⊗ b[r]``, each from one row of ``a`` and one of ``b`` (reference)."""
    m2 = b.shape[1]
    a_rows = a[:, index // m2]  # (R, *idx, n1)
    b_rows = b[:, index % m2]  # (R, *idx, n2)
    out = torch.einsum("r...j,r...k->...jk", a_rows, b_rows)
    return out.reshape(*index.shape, a.shape[2] * b.shape[2])
