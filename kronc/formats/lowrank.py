"""Low rank: ``W ≈ U @ V`` with ``U`` of shape ``(out, r)`` and ``V`` of shape ``(r, in)``.

Fitted by truncated SVD (optimal in Frobenius norm); the singular values are split evenly
between the factors (``U = U_r sqrt(S_r)``, ``V = sqrt(S_r) V_r^T``) so both train at the same scale.
At an integer precision ``U`` is grouped along its outputs (one row of codes per component) and ``V``
along its inputs; ``V`` takes ``fit='gptq'`` with the input Gram matrix.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..codegen import ops as _ops  # noqa: F401  (registers the torch.ops.kronc.* ops used below)
from .base import Factorized, FormatError, FormatSpec, Layout, Shape, check_matrix, svd_dtype
from .registry import register_format


class LowRankSpec(FormatSpec):
    """Truncated SVD with ``rank`` components."""

    kind: Literal["lowrank"] = "lowrank"
    rank: int = Field(ge=1, description="Number of singular components kept.")

    @property
    def factor_rank(self) -> int | None:
        return self.rank

    def check(self, shape: Shape) -> None:
        if self.rank > min(shape):
            raise FormatError(f"lowrank rank={self.rank} exceeds min(out, in)={min(shape)} of a {shape[0]}x{shape[1]} weight")
        self.check_precision(shape)

    def stored_values(self, shape: Shape) -> dict[str, tuple[tuple[int, ...], Layout]]:
        return {"u": ((shape[0], self.rank), "transposed"), "v": ((self.rank, shape[1]), "rows")}

    def nbytes(self, shape: Shape, itemsize: int) -> int:
        return self.values_bytes(shape, itemsize)

    def nparams(self, shape: Shape) -> int:
        return self.rank * (shape[0] + shape[1])

    def flops_per_token(self, shape: Shape) -> int:
        return 2 * self.rank * (shape[0] + shape[1])

    def describe(self) -> str:
        return f"lowrank(r={self.rank}){self.precision_tag()}"


class LowRank(Factorized):
    spec_type = LowRankSpec
    factored_overhead = 2.0  # measured: kronc.formats.training

    def __init__(self, u: Tensor, v: Tensor, spec: LowRankSpec, h: Tensor | None = None) -> None:
        """``h``: the input Gram matrix, for a ``gptq`` precision of ``V``."""
        super().__init__(spec, (u.shape[0], v.shape[1]))
        if u.shape[1] != spec.rank or v.shape[0] != spec.rank:
            raise FormatError(f"lowrank factors {tuple(u.shape)} and {tuple(v.shape)} do not have rank {spec.rank}")
        self.put("u", u)
        self.put("v", v, h)

    @classmethod
    def fit(cls, weight: Tensor, spec: FormatSpec) -> LowRank:
        assert isinstance(spec, LowRankSpec)
        check_matrix(weight)
        spec.check(tuple(weight.shape))  # type: ignore[arg-type]
        w = weight.detach().to(svd_dtype(weight))
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[: spec.rank].sqrt()
        u = u[:, : spec.rank] * root
        v = root[:, None] * vh[: spec.rank]
        return cls(u.to(weight.dtype), v.to(weight.dtype), spec)

    @classmethod
    def empty(cls, spec: FormatSpec, shape: Shape, dtype: torch.dtype) -> LowRank:
        assert isinstance(spec, LowRankSpec)
        return cls(torch.zeros(shape[0], spec.rank, dtype=dtype), torch.zeros(spec.rank, shape[1], dtype=dtype), spec)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return torch.ops.kronc.lowrank_linear(x, self.value("u", x.dtype), self.value("v", x.dtype), bias)

    def rows(self, index: Tensor) -> Tensor:
        return self.value("u")[index] @ self.value("v")

    def to_dense(self) -> Tensor:
        return self.value("u") @ self.value("v")

    def build_flops(self) -> int:
        return 2 * self.spec.rank * self.shape[0] * self.shape[1]  # type: ignore[attr-defined]

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        return self.value("u", dtype) @ self.value("v", dtype)


register_format(LowRank)
