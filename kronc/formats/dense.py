"""Dense: the weight as a full matrix, kept as it is (the identity choice) or at a lower precision.

``DenseSpec()`` (precision None) leaves a site alone. With a precision the weight is stored cast
(bf16/fp16) or quantized (int8 with one scale per row, int4/int3/int2 with per-group scales) and
applied by ``kronc::quant_linear`` on the packed codes (`kronc.values.QuantizedTensor.linear`), which
picks aten's packed int8/int4 CPU kernels where they fit. An integer precision may be rotated
(``rotate``: the codes are those of ``W R``, and the input is rotated before the op); the dense weight
is the only stored tensor that takes a rotation.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from ..values import Encoded, QuantizedTensor
from .base import Factorized, Layout, Shape, check_matrix
from .base import FormatSpec as _Spec
from .registry import register_format


class DenseSpec(_Spec):
    """Keep the weight dense (at ``precision``; None keeps it as it is)."""

    kind: Literal["dense"] = "dense"
    rotates: ClassVar[bool] = True

    @property
    def identity(self) -> bool:  # type: ignore[override]
        """Only the full-precision dense spec leaves a weight untouched."""
        return self.precision is None

    def stored_values(self, shape: Shape) -> dict[str, tuple[tuple[int, ...], Layout]]:
        return {"weight": ((shape[0], shape[1]), "rows")}

    def check(self, shape: Shape) -> None:
        self.check_precision(shape)

    def nbytes(self, shape: Shape, itemsize: int) -> int:
        return self.values_bytes(shape, itemsize)

    def nparams(self, shape: Shape) -> int:
        return shape[0] * shape[1]

    def flops_per_token(self, shape: Shape) -> int:
        return 2 * shape[0] * shape[1]

    def describe(self) -> str:
        return "dense" + self.precision_tag()


class Dense(Factorized):
    spec_type = DenseSpec
    weight: nn.Parameter | QuantizedTensor  # float values, or integer codes for a quantized precision

    def __init__(self, weight: Tensor, spec: DenseSpec | None = None, h: Tensor | None = None,
                 encoded: Encoded | None = None) -> None:
        """``encoded``: the weight's codes, already fitted at the spec's precision (see `Factorized.put`)."""
        check_matrix(weight)
        super().__init__(spec or DenseSpec(), tuple(weight.shape))  # type: ignore[arg-type]
        self.put("weight", weight, h, encoded)

    @classmethod
    def fit(cls, weight: Tensor, spec: _Spec, h: Tensor | None = None) -> Dense:
        """``h``: the input Gram matrix ``X^T X`` for a ``gptq`` precision (else the data-free fit)."""
        assert isinstance(spec, DenseSpec)
        return cls(weight, spec, h)

    @classmethod
    def empty(cls, spec: _Spec, shape: Shape, dtype: torch.dtype) -> Dense:
        assert isinstance(spec, DenseSpec)
        return cls(torch.zeros(shape, dtype=dtype), spec)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        w = self.weight
        if isinstance(w, QuantizedTensor):
            return w.linear(x, bias)
        return torch.nn.functional.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), bias)

    def rows(self, index: Tensor) -> Tensor:
        """The gathered rows only, decoded (quantized) or cast (a float precision) to the compute dtype."""
        w = self.weight
        if isinstance(w, QuantizedTensor):
            return w.rows(index, self.dtype)
        rows = w[index]
        return rows if rows.dtype == self.dtype else rows.to(self.dtype)

    def to_dense(self) -> Tensor:
        return self.value("weight")


register_format(Dense)
