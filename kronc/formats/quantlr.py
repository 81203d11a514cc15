"""Quantized base plus low-rank correction: ``W ≈ Q + L R`` (LQER / CALDERA).

``Q`` is the whole weight on an integer grid (``base``: e.g. int2/int3/int4 with group scales),
applied by ``kronc::quant_linear`` on its packed codes; ``L`` ``(out, r)`` and ``R`` ``(r, in)`` correct
the quantization error where it matters most, stored at the spec's ``precision`` (None: the weight's
dtype) and applied by ``kronc::lowrank_linear``. Fitted by `kronc.values.fit_joint`: quantize, take
the best rank-``r`` approximation of the error (whitened by the input Gram matrix when given), and
alternate; the best iterate is kept, so the fit is never worse than LQER's single step.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ..codegen import ops as _ops  # noqa: F401  (registers the torch.ops.kronc.* ops used below)
from ..values import Precision, PrecisionError, QuantizedTensor, encode, fit_joint
from .base import Factorized, FormatError, FormatSpec, Layout, Shape, check_matrix
from .registry import register_format


class QuantLowRankSpec(FormatSpec):
    """The weight at integer precision ``base`` plus a rank-``rank`` correction."""

    kind: Literal["quantlr"] = "quantlr"
    base: Precision = Field(description="Integer precision of the quantized base Q (the whole weight).")
    rank: int = Field(ge=1, description="Rank of the correction L R.")

    @field_validator("base")
    @classmethod
    def _integer(cls, p: Precision) -> Precision:
        if p.is_float:
            raise ValueError(f"base must be an integer precision (int8/int4/int3/int2), got {p.dtype}")
        if p.rotate:
            raise ValueError(f"base {p.describe()}: rotate=true applies to the dense format's weight only; use rotate=false")
        return p

    def stored_values(self, shape: Shape) -> dict[str, tuple[tuple[int, ...], Layout]]:
        return {"left": ((shape[0], self.rank), "transposed"), "right": ((self.rank, shape[1]), "rows")}

    def check(self, shape: Shape) -> None:
        if self.rank > min(shape):
            raise FormatError(f"quantlr rank={self.rank} exceeds min(out, in)={min(shape)} of a {shape[0]}x{shape[1]} weight")
        try:
            self.base.check_shape(shape)
        except PrecisionError as e:
            raise FormatError(f"quantlr base on a {shape[0]}x{shape[1]} weight: {e}") from None
        self.check_precision(shape)

    def nbytes(self, shape: Shape, itemsize: int) -> int:
        return self.base.nbytes(shape) + self.values_bytes(shape, itemsize)

    def nparams(self, shape: Shape) -> int:
        return shape[0] * shape[1] + self.rank * (shape[0] + shape[1])

    def flops_per_token(self, shape: Shape) -> int:
        return 2 * shape[0] * shape[1] + 2 * self.rank * (shape[0] + shape[1])

    def describe(self) -> str:
        return f"{self.base.describe()}+lr(r={self.rank}){self.precision_tag()}"


class QuantLowRank(Factorized):
    spec_type = QuantLowRankSpec
    factored_overhead = 2.0  # measured: kronc.formats.training

    def __init__(self, base: QuantizedTensor, left: Tensor, right: Tensor, spec: QuantLowRankSpec) -> None:
        super().__init__(spec, (left.shape[0], right.shape[1]))
        if tuple(base.shape) != self.shape or left.shape[1] != spec.rank or right.shape[0] != spec.rank:
            raise FormatError(f"quantlr parts {tuple(base.shape)}, {tuple(left.shape)}, {tuple(right.shape)} "
                              f"do not make a rank-{spec.rank} correction of one weight")
        self.base = base
        self.put("left", left)
        self.put("right", right)

    @classmethod
    def fit(cls, weight: Tensor, spec: FormatSpec, h: Tensor | None = None, iters: int = 4) -> QuantLowRank:
        """`fit_joint`; ``h`` (input Gram matrix) makes it data-aware (and feeds a ``gptq`` base)."""
        assert isinstance(spec, QuantLowRankSpec)
        check_matrix(weight)
        spec.check(tuple(weight.shape))  # type: ignore[arg-type]
        base = spec.base if h is not None or spec.base.fit != "gptq" else spec.base.model_copy(update={"fit": "hqq"})
        jf = fit_joint(weight.detach().float(), base, spec.rank, h, iters=iters)
        q = QuantizedTensor(jf.base)
        q.precision = spec.base
        return cls(q, jf.left.to(weight.dtype), jf.right.to(weight.dtype), spec)

    @classmethod
    def empty(cls, spec: FormatSpec, shape: Shape, dtype: torch.dtype) -> QuantLowRank:
        assert isinstance(spec, QuantLowRankSpec)
        base = QuantizedTensor(encode(torch.zeros(shape), spec.base.model_copy(update={"fit": "rtn"})))
        base.precision = spec.base
        return cls(base, torch.zeros(shape[0], spec.rank, dtype=dtype), torch.zeros(spec.rank, shape[1], dtype=dtype), spec)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        low = torch.ops.kronc.lowrank_linear(x, self.value("left", x.dtype), self.value("right", x.dtype), None)
        return self.base.linear(x, bias) + low

    def rows(self, index: Tensor) -> Tensor:
        return self.base.dequantize(self.dtype)[index] + self.value("left")[index] @ self.value("right")

    def to_dense(self) -> Tensor:
        return self.base.dequantize(self.dtype) + self.value("left") @ self.value("right")

    def build_flops(self) -> int:
        return (1 + 2 * self.spec.rank) * self.shape[0] * self.shape[1]  # type: ignore[attr-defined]


register_format(QuantLowRank)
