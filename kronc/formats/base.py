"""The interface every compression format implements.

A format has two halves:

* a **spec** (`FormatSpec` subclass, a frozen pydantic model with a ``kind`` tag): the choice of
  format and its parameters. Specs are what plans and policies store. From a spec and a weight
  shape alone they give exact stored bytes, stored parameters and FLOPs per token, so the planner
  can price a candidate without fitting it.
* a **factorized weight** (`Factorized` subclass, an ``nn.Module``): the fitted representation of
  one weight matrix ``W`` of logical shape ``(out, in)``. It applies ``x @ W.T`` without building
  ``W`` (``forward``), gathers rows of ``W`` for embedding lookups (``rows``) and can rebuild ``W``
  for checks (``to_dense``). Its byte count is read off the tensors it actually stores, and the
  tests check that it equals the spec's formula.

Bytes count every stored tensor: values in the weight's dtype, sparse and block indices in the
integer dtype they are stored in. Bias vectors are not part of a site's weight bytes: they stay
dense and are the same before and after.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

Shape = tuple[int, int]


class FormatError(ValueError):
    """A format parameter does not fit the weight it is applied to."""


class FormatSpec(BaseModel, ABC):
    """Parameters of one compression format, independent of any particular weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    identity: ClassVar[bool] = False
    """True for the spec that leaves a weight as it is (dense): nothing to fit or swap."""

    @abstractmethod
    def check(self, shape: Shape) -> None:
        """Raise `FormatError` naming the parameter when this spec cannot represent ``shape``."""

    @abstractmethod
    def nbytes(self, shape: Shape, itemsize: int) -> int:
        """Exact bytes stored for a weight of ``shape`` with values of ``itemsize`` bytes."""

    @abstractmethod
    def nparams(self, shape: Shape) -> int:
        """Stored values (indices excluded)."""

    @abstractmethod
    def flops_per_token(self, shape: Shape) -> int:
        """Floating point operations (2 per multiply-add) to apply the weight to one input vector."""

    def describe(self) -> str:
        """Short human-readable form, e.g. ``kron(24x24)x2``."""
        fields = ",".join(f"{k}={v}" for k, v in self.model_dump(exclude={"kind"}).items())
        return f"{self.kind}({fields})"


class Factorized(nn.Module, ABC):
    """A weight matrix of logical shape ``(out, in)`` stored in a compressed format."""

    spec_type: ClassVar[type[FormatSpec]]

    def __init__(self, spec: FormatSpec, shape: Shape) -> None:
        super().__init__()
        spec.check(shape)
        self.spec = spec
        self.shape: Shape = (int(shape[0]), int(shape[1]))

    @classmethod
    @abstractmethod
    def fit(cls, weight: Tensor, spec: FormatSpec) -> Factorized:
        """Fit the format to a dense ``(out, in)`` weight (nearest in Frobenius norm)."""

    @classmethod
    def empty(cls, spec: FormatSpec, shape: Shape, dtype: torch.dtype) -> Factorized:
        """A module of ``spec``'s structure with uninitialised values, for loading a state dict into.

        The default fits a zero matrix; formats override it when fitting is slow or positions matter.
        """
        return cls.fit(torch.zeros(shape, dtype=dtype), spec)

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """``x @ W.T`` for ``x`` of shape ``(..., in)``, without materialising ``W``."""

    @abstractmethod
    def rows(self, index: Tensor) -> Tensor:
        """``W[index]`` of shape ``(*index.shape, in)``, without materialising ``W``."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The dense ``(out, in)`` matrix this format represents (for checks and references)."""

    @property
    def dtype(self) -> torch.dtype:
        return next(t for t in self._stored() if t.is_floating_point()).dtype

    def _stored(self) -> list[Tensor]:
        return [*self.parameters(), *self.buffers()]

    def nbytes(self) -> int:
        """Bytes of every tensor this module stores (values and indices)."""
        return sum(t.numel() * t.element_size() for t in self._stored())

    def nparams(self) -> int:
        """Stored floating point values."""
        return sum(t.numel() for t in self._stored() if t.is_floating_point())

    def flops_per_token(self) -> int:
        return self.spec.flops_per_token(self.shape)

    def extra_repr(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}, {self.spec.describe()}"


def check_matrix(weight: Tensor, what: str = "weight") -> None:
    if weight.dim() != 2:
        raise FormatError(f"{what} must be a 2-D (out, in) matrix, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise FormatError(f"{what} must be floating point, got {weight.dtype}")


def svd_dtype(weight: Tensor) -> torch.dtype:
    """SVDs and fits run in at least float32 (float64 stays float64)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32
