"""Kronecker sum: ``W ≈ Σ_r A_r ⊗ B_r`` with ``A_r`` of shape ``(m1, n1)`` and ``B_r`` of ``(m2, n2)``.

``W`` is ``(m1*m2, n1*n2)``. The nearest sum of ``R`` Kronecker products in Frobenius norm comes
from the Van Loan–Pitsianis rearrangement: the ``(m1*n1, m2*n2)`` matrix whose row ``(i1, j1)`` is
the flattened ``(i1, j1)`` block of ``W`` has rank-one terms that are exactly ``vec(A_r) vec(B_r)^T``,
so its truncated SVD gives the best ``A_r, B_r`` and its tail singular values give the error of
every term count at once.

Applied to ``x`` as two small matmuls on ``x`` reshaped to ``(n1, n2)``: ``Y = Σ_r A_r X B_r^T``
(whichever contraction order costs fewer FLOPs, `kronc.reference.kronecker.b_first`), never building ``W``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..codegen import ops as _ops  # noqa: F401  (registers the torch.ops.kronc.* ops used below)
from ..reference.kronecker import contraction_costs, rearrange
from .base import Factorized, FormatError, FormatSpec, Layout, Shape, check_matrix, svd_dtype
from .registry import register_format


class KroneckerSpec(FormatSpec):
    """Sum of ``terms`` Kronecker products with first factor of shape ``a_shape``."""

    kind: Literal["kronecker"] = "kronecker"
    a_shape: tuple[int, int] = Field(description="Shape (m1, n1) of each A_r; B_r is (out/m1, in/n1).")
    terms: int = Field(default=1, ge=1, description="Number of Kronecker products summed.")

    def b_shape(self, shape: Shape) -> Shape:
        return shape[0] // self.a_shape[0], shape[1] // self.a_shape[1]

    def check(self, shape: Shape) -> None:
        m1, n1 = self.a_shape
        if m1 < 1 or n1 < 1 or shape[0] % m1 or shape[1] % n1:
            raise FormatError(
                f"kronecker a_shape={self.a_shape} does not divide a {shape[0]}x{shape[1]} weight "
                f"(m1 must divide {shape[0]} and n1 must divide {shape[1]})"
            )
        m2, n2 = self.b_shape(shape)
        if self.terms > min(m1 * n1, m2 * n2):
            raise FormatError(
                f"kronecker terms={self.terms} exceeds the rank bound {min(m1 * n1, m2 * n2)} "
                f"of a_shape={self.a_shape} on a {shape[0]}x{shape[1]} weight"
            )
        self.check_precision(shape)

    def stored_values(self, shape: Shape) -> dict[str, tuple[tuple[int, ...], Layout]]:
        """Each factor is one row of codes (``A_r`` flattened), so groups run over the whole factor."""
        m2, n2 = self.b_shape(shape)
        return {"a": ((self.terms, *self.a_shape), "flat"), "b": ((self.terms, m2, n2), "flat")}

    def nparams(self, shape: Shape) -> int:
        m2, n2 = self.b_shape(shape)
        return self.terms * (self.a_shape[0] * self.a_shape[1] + m2 * n2)

    def nbytes(self, shape: Shape, itemsize: int) -> int:
        return self.values_bytes(shape, itemsize)

    def flops_per_token(self, shape: Shape) -> int:
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape(shape)
        return 2 * self.terms * min(contraction_costs(m1, n1, m2, n2))

    def describe(self) -> str:
        return f"kron({self.a_shape[0]}x{self.a_shape[1]})x{self.terms}{self.precision_tag()}"


class Kronecker(Factorized):
    spec_type = KroneckerSpec
    factored_overhead = 4.0  # measured: kronc.formats.training

    def __init__(self, a: Tensor, b: Tensor, spec: KroneckerSpec) -> None:
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[0] != spec.terms:
            raise FormatError(f"kronecker factors must be (terms, m, n) stacks, got {tuple(a.shape)} and {tuple(b.shape)}")
        super().__init__(spec, (a.shape[1] * b.shape[1], a.shape[2] * b.shape[2]))
        self.put("a", a)
        self.put("b", b)

    @classmethod
    def fit(cls, weight: Tensor, spec: FormatSpec) -> Kronecker:
        assert isinstance(spec, KroneckerSpec)
        check_matrix(weight)
        spec.check(tuple(weight.shape))  # type: ignore[arg-type]
        (m1, n1), (m2, n2) = spec.a_shape, spec.b_shape(tuple(weight.shape))  # type: ignore[arg-type]
        r = rearrange(weight.detach().to(svd_dtype(weight)), spec.a_shape)
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        root = s[: spec.terms].sqrt()
        a = (u[:, : spec.terms] * root).T.reshape(spec.terms, m1, n1)
        b = (root[:, None] * vh[: spec.terms]).reshape(spec.terms, m2, n2)
        return cls(a.to(weight.dtype), b.to(weight.dtype), spec)

    @classmethod
    def empty(cls, spec: FormatSpec, shape: Shape, dtype: torch.dtype) -> Kronecker:
        assert isinstance(spec, KroneckerSpec)
        (m1, n1), (m2, n2) = spec.a_shape, spec.b_shape(shape)
        return cls(torch.zeros(spec.terms, m1, n1, dtype=dtype), torch.zeros(spec.terms, m2, n2, dtype=dtype), spec)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return torch.ops.kronc.kron_linear(x, self.value("a", x.dtype), self.value("b", x.dtype), bias)

    def rows(self, index: Tensor) -> Tensor:
        return torch.ops.kronc.kron_embedding(index, self.value("a"), self.value("b"))

    def to_dense(self) -> Tensor:
        a, b = self.value("a"), self.value("b")
        return sum(torch.kron(a[r], b[r]) for r in range(a.shape[0]))  # type: ignore[return-value]

    def build_flops(self) -> int:
        return 2 * self.spec.terms * self.shape[0] * self.shape[1]  # type: ignore[attr-defined]

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        """``Σ_r A_r ⊗ B_r`` as one GEMM over the terms (``(m1 n1, R) @ (R, m2 n2)``) and one permute,
        not a Python loop of ``torch.kron`` (the training path builds it every step)."""
        a, b = self.value("a", dtype), self.value("b", dtype)
        (r, m1, n1), (_, m2, n2) = a.shape, b.shape
        w = (a.reshape(r, m1 * n1).T @ b.reshape(r, m2 * n2)).reshape(m1, n1, m2, n2)
        return w.permute(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)


register_format(Kronecker)
