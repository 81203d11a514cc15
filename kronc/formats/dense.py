"""Dense: the identity choice, a site left as it is."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .base import Factorized, Shape, check_matrix
from .base import FormatSpec as _Spec
from .registry import register_format


class DenseSpec(_Spec):
    """Keep the weight dense."""

    kind: Literal["dense"] = "dense"
    identity: ClassVar[bool] = True

    def check(self, shape: Shape) -> None:
        return None

    def nbytes(self, shape: Shape, itemsize: int) -> int:
        return shape[0] * shape[1] * itemsize

    def nparams(self, shape: Shape) -> int:
        return shape[0] * shape[1]

    def flops_per_token(self, shape: Shape) -> int:
        return 2 * shape[0] * shape[1]

    def describe(self) -> str:
        return "dense"


class Dense(Factorized):
    spec_type = DenseSpec

    def __init__(self, weight: Tensor, spec: DenseSpec | None = None) -> None:
        check_matrix(weight)
        super().__init__(spec or DenseSpec(), tuple(weight.shape))  # type: ignore[arg-type]
        self.weight = nn.Parameter(weight.detach().clone())

    @classmethod
    def fit(cls, weight: Tensor, spec: _Spec) -> Dense:
        assert isinstance(spec, DenseSpec)
        return cls(weight, spec)

    @classmethod
    def empty(cls, spec: _Spec, shape: Shape, dtype: torch.dtype) -> Dense:
        assert isinstance(spec, DenseSpec)
        return cls(torch.empty(shape, dtype=dtype), spec)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.weight)

    def rows(self, index: Tensor) -> Tensor:
        return self.weight[index]

    def to_dense(self) -> Tensor:
        return self.weight


register_format(Dense)
