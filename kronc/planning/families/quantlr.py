"""Quantized base plus low-rank correction on the planning side: (base precision x rank) candidates,
every rank's error from one decomposition of the base's quantization error, the data-aware joint fit.

The estimate is LQER's single step (quantize ``W``, then the best rank-``r`` approximation of the
error, whitened by ``H`` when data-aware): the eigenvalues of ``E Eᵀ`` (or ``E H Eᵀ``) give every
rank's error at once. The fit (`kronc.values.fit_joint`) keeps the best iterate of the alternation
that starts with exactly that step, so the estimate is an upper bound of the fitted error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import Field
from torch import Tensor

from ...formats import FormatSpec, QuantLowRank, QuantLowRankSpec, Shape
from ...values import Precision, decode, encode
from ..estimate import F64, SiteAnalysis, eig_desc, tail_sums
from ..options import SearchOptions
from .base import Choice, Family, register_family


class QuantLowRankChoice(Choice):
    """A quantized base ``Q`` plus a low-rank correction ``L R`` of its error."""

    kind: Literal["quantlr"] = "quantlr"
    """Format tag: ``quantlr``."""
    bases: list[Precision] = Field(default_factory=lambda: [
        Precision(dtype="int3", group_size=64, symmetric=False, fit="hqq"),
        Precision(dtype="int2", group_size=32, symmetric=False, fit="hqq"),
    ])
    """Integer precisions of the base searched (a ``gptq`` one is estimated by its ``hqq`` error)."""
    ranks: list[int] = Field(default_factory=lambda: [8, 16, 32, 64])
    """Ranks of the correction searched (those above ``min(out, in)`` are skipped)."""

    def describe(self) -> str:
        bases = ",".join(p.describe() for p in self.bases)
        return f"quantlr({bases}, ranks {','.join(map(str, self.ranks))})" + self.precision_note()


class QuantLowRankFamily(Family):
    kind = "quantlr"
    choice = QuantLowRankChoice

    def structures(self, shape: Shape, choice: Choice, options: SearchOptions) -> Iterable[FormatSpec]:
        assert isinstance(choice, QuantLowRankChoice)
        out = []
        for base in choice.bases:
            try:
                base.check_shape(shape)
            except ValueError:
                continue
            out += [QuantLowRankSpec(base=base, rank=r) for r in choice.ranks if r <= min(shape)]
        return out

    def errors(self, analysis: SiteAnalysis, specs: Sequence[FormatSpec]) -> list[float]:
        tails: dict[Precision, Tensor] = {}
        out = []
        for spec in specs:
            assert isinstance(spec, QuantLowRankSpec)
            base = spec.base if spec.base.fit != "gptq" else spec.base.model_copy(update={"fit": "hqq"})
            if base not in tails:
                e = decode(encode(analysis.w32, base)).to(F64) - analysis.w32.to(F64)
                m, n = e.shape
                if analysis.h is None:
                    gram = e @ e.T if m <= n else e.T @ e
                elif m <= n:
                    gram = (e @ analysis.h) @ e.T
                else:
                    s = analysis.whitened_input()
                    es = e @ s
                    gram = es.T @ es
                tails[base] = tail_sums(eig_desc(gram, False)[0])
            t = tails[base]
            out.append(analysis.rel(t[min(spec.rank, t.numel() - 1)]))
        return out

    def fit(self, weight: Tensor, spec: FormatSpec, moments: Tensor | None, damping: float) -> QuantLowRank:
        assert isinstance(spec, QuantLowRankSpec)
        return QuantLowRank.fit(weight, spec, h=moments)


register_family(QuantLowRankFamily())
