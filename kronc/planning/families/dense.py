"""Dense: the identity choice (a site left as it is); error zero."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from torch import Tensor

from ...formats import Dense, DenseSpec, FormatSpec, Shape
from ..estimate import SiteAnalysis
from ..options import SearchOptions
from .base import Choice, Family


class DenseChoice(Choice):
    """Leave the site dense."""

    kind: Literal["dense"] = "dense"
    """Format tag: ``dense`` keeps the weight as it is."""

    @property
    def identity(self) -> bool:
        return self.precisions == ["keep"]  # a lower precision compresses


class DenseFamily(Family):
    kind = "dense"
    choice = DenseChoice

    def structures(self, shape: Shape, choice: Choice, options: SearchOptions) -> Iterable[FormatSpec]:
        return [DenseSpec()]

    def errors(self, analysis: SiteAnalysis, specs: Sequence[FormatSpec]) -> list[float]:
        return [0.0] * len(specs)

    def fit(self, weight: Tensor, spec: FormatSpec, moments: Tensor | None, damping: float) -> Dense:
        """At a ``gptq`` precision the input moments are the Gram matrix the fit compensates with."""
        assert isinstance(spec, DenseSpec)
        return Dense.fit(weight, spec, h=moments)

    def uniform(self, shape: Shape, itemsize: int, cap: float, options: SearchOptions) -> list[FormatSpec]:
        return [DenseSpec()] if shape[0] * shape[1] * itemsize <= cap else []

