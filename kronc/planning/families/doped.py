"""Doping on the planning side: bases (Kronecker, low rank, none) x overlay densities; every density's
error from one sorted residual; the data-aware (Wanda-ranked) fit."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ...formats import Doped, DopedSpec, FormatSpec, KroneckerSpec, LowRankSpec, Shape
from ...formats.sparse_index import count_kept
from ..estimate import SiteAnalysis
from ..options import SearchOptions
from ..shapes import factor_shapes, geometric, max_saving_rank, most_balanced
from ..whiten import column_scale, damped
from .base import Choice, Family
from .kronecker import FactorShapes, describe_shapes, kron_errors, kron_shapes, kron_specs


class DopedChoice(Choice):
    """A structured base plus a sparse overlay of the residual's largest entries."""

    kind: Literal["doped"] = "doped"
    """Format tag: ``doped``."""
    base: Literal["kronecker", "lowrank", "none"] = "kronecker"
    """Structured part: Kronecker (doped Kronecker), low rank, or none (unstructured pruning)."""
    density_min: float = Field(default=0.001, gt=0, le=1)
    """Smallest overlay density considered."""
    density_max: float = Field(default=0.05, gt=0, le=1)
    """Largest overlay density considered (densities that store no fewer bytes than dense are skipped:
    with a bitmap index that is about 0.97 for float32 values, 0.94 for bfloat16)."""
    densities: int = Field(default=8, ge=1)
    """How many densities to try, spaced geometrically from ``density_min`` to ``density_max``."""
    a_shapes: FactorShapes = "auto"
    """Kronecker base only: factor shapes, as in ``kronecker``."""
    min_factor: int = Field(default=2, ge=1)
    """Kronecker base only: as in ``kronecker``."""
    terms_max: int = Field(default=2, ge=1)
    """Kronecker base only: largest number of terms in the base."""
    rank_multiple: int = Field(default=8, ge=1)
    """Low-rank base only: ranks considered are multiples of this."""

    @model_validator(mode="after")
    def _ordered(self) -> DopedChoice:
        if self.density_max < self.density_min:
            raise ValueError(f"density_max ({self.density_max}) must be >= density_min ({self.density_min})")
        return self

    def describe(self) -> str:
        base: str = self.base
        if base == "kronecker":
            base = f"kronecker {describe_shapes(self.a_shapes)}, terms<={self.terms_max}"
        return f"doped({base}, density {self.density_min:g}-{self.density_max:g})" + self.precision_note()


PRUNING = DopedChoice(base="none", density_min=0.02, density_max=0.9, densities=12)
"""Unstructured pruning (a doped format with no base, entries ranked per output row) from 2% to 90%
of the entries kept."""


def doped_bases(shape: Shape, choice: DopedChoice, options: SearchOptions) -> list[KroneckerSpec | LowRankSpec | None]:
    """Base candidates of a doped choice: a few Kronecker sums, a few ranks, or no base.

    With ``a_shapes: auto`` the Kronecker bases use the ``options.doped_shapes`` cheapest-per-term
    shapes among those `factor_shapes` picks (doping exists to rescue very compressed bases, and
    reusing the plain Kronecker shapes shares their decompositions). Low-rank bases take
    ``options.doped_ranks`` multiples of ``rank_multiple`` spaced geometrically up to half the
    break-even rank, leaving room for the overlay.
    """
    if choice.base == "none":
        return [None]
    if choice.base == "kronecker":
        if choice.a_shapes == "auto":
            pairs = most_balanced(shape, factor_shapes(shape, choice.min_factor, options.kron_shapes), options.doped_shapes)
        else:
            pairs = kron_shapes(shape, choice.a_shapes, choice.min_factor, options.kron_shapes)
        return list(kron_specs(shape, pairs, choice.terms_max))
    step = choice.rank_multiple
    cap = max(1, max_saving_rank(shape) // 2)
    if cap < step:
        ranks = [cap]
    else:
        ranks = sorted({step * round(v) for v in geometric(1.0, cap / step, options.doped_ranks)})
    return [LowRankSpec(rank=r) for r in ranks if 1 <= r <= min(shape)]


def doped_errors(an: SiteAnalysis, base: LowRankSpec | None, kept: Sequence[int]) -> dict[int, float]:
    """Errors of a low-rank (weight-space fit) or empty base plus the ``kept`` largest residual entries."""
    if base is None:
        return an.overlay_errors(an.w, an.p, kept, balanced=True)
    _, vec = an.spectrum(whitened=False, vectors=True, upto=base.rank)
    assert vec is not None
    dt = torch.promote_types(vec.dtype, an.w.dtype)
    v = vec[:, : base.rank].to(dt)
    m, n = an.shape
    w = an.w.to(dt)
    if m <= n:
        resid = w - v @ (v.T @ w)
        q = None if an.p is None else an.p - v @ (v.T @ an.p)
    else:
        wv = w @ v
        resid = w - wv @ v.T
        q = None if an.h is None or an.p is None else an.p - wv @ (v.T @ an.h)
    return an.overlay_errors(resid, q, kept)


class DopedFamily(Family):
    kind = "doped"
    choice = DopedChoice

    def structures(self, shape: Shape, choice: Choice, options: SearchOptions) -> Iterable[FormatSpec]:
        assert isinstance(choice, DopedChoice)
        total = shape[0] * shape[1]
        densities = geometric(choice.density_min, choice.density_max, choice.densities)
        for base in doped_bases(shape, choice, options):
            kept: set[int] = set()
            for d in densities:
                nnz = count_kept(d, total)
                if nnz in kept or (base is None and nnz == 0):
                    continue
                kept.add(nnz)
                yield DopedSpec(base=base, density=d)

    def errors(self, analysis: SiteAnalysis, specs: Sequence[FormatSpec]) -> list[float]:
        shape = analysis.shape
        kron: dict[tuple[int, int], dict[int, set[int]]] = {}
        other: dict[LowRankSpec | None, set[int]] = {}
        for s in specs:
            assert isinstance(s, DopedSpec)
            if isinstance(s.base, KroneckerSpec):
                kron.setdefault(s.base.a_shape, {}).setdefault(s.base.terms, set()).add(s.nnz(shape))
            else:
                other.setdefault(s.base, set()).add(s.nnz(shape))
        kd = {a: kron_errors(analysis, a, [], {t: sorted(k) for t, k in by_t.items()})[1] for a, by_t in sorted(kron.items())}
        od = {base: doped_errors(analysis, base, sorted(k)) for base, k in other.items()}
        out = []
        for s in specs:
            assert isinstance(s, DopedSpec)
            if isinstance(s.base, KroneckerSpec):
                out.append(kd[s.base.a_shape][(s.base.terms, s.nnz(shape))])
            else:
                out.append(od[s.base][s.nnz(shape)])
        return out

    screens = True

    def screen(self, analysis: SiteAnalysis, specs: Sequence[FormatSpec]) -> list[float]:
        """Pruning (no base): each sampled row (`SiteAnalysis.row_sample`) keeps its share of entries,
        largest ``|W_ij| sqrt(H_jj)`` first, and loses the rest in the diagonal metric ``Σ H_jj E_ij²``;
        scaled by the rows' share of the energy. Bases: 0 (never screened out)."""
        rows, cw, factor = analysis.row_sample()
        sq = rows.square() if cw is None else rows.square() * cw
        cum = torch.cat([torch.zeros(sq.shape[0], 1), sq.sort(1, descending=True).values.cumsum(1)], 1).to(torch.float64)
        total = cum[:, -1]
        m, n = analysis.shape
        out = []
        for s in specs:
            assert isinstance(s, DopedSpec)
            if s.base is not None:
                out.append(0.0)
                continue
            per_row = min(n, int(round(s.nnz(analysis.shape) / m)))
            out.append(analysis.rel(float((total - cum[:, per_row]).sum()) * factor))
        return out

    def fit(self, weight: Tensor, spec: FormatSpec, moments: Tensor | None, damping: float) -> Doped:
        scale = None if moments is None else column_scale(damped(moments, damping))
        return Doped.fit(weight, spec, column_scale=scale)

    def uniform(self, shape: Shape, itemsize: int, cap: float, options: SearchOptions) -> list[FormatSpec]:
        total = shape[0] * shape[1]
        nnz = largest(lambda k: DopedSpec(density=k / total).nbytes(shape, itemsize) <= cap, total)
        return [DopedSpec(density=nnz / total)] if nnz >= 1 else []


def largest(fits: Callable[[int], bool], hi: int) -> int:
    """Largest ``k`` in ``[0, hi]`` with ``fits(k)`` (``fits`` monotone: true then false); 0 if none."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo

