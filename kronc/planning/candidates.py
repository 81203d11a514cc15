"""Candidate generation: every concrete format spec a site's allowed `FormatChoice`s admit.

Candidates are priced from their spec alone (exact bytes and stored values, indices counted), so
nothing here touches the weight. Rules, per choice:

* ``dense``: the identity candidate. Dense is a candidate **only when a rule allows it** (a
  `DenseChoice` in the site's space): a policy that lists only compressed formats for a site means
  that site must be compressed.
* ``lowrank``: ``rank_min`` and every multiple of ``rank_multiple`` up to ``rank_max``, keeping only
  ranks that store fewer bytes than dense (``r (m + n) < m n``).
* ``kronecker``: factor shapes from divisor pairs of ``out`` and ``in`` (see `factor_shapes`), every
  term count from 1 to ``terms_max`` (and the rank bound of the rearranged matrix).
* ``doped``: a few base candidates (Kronecker, low rank, or none) times ``densities`` overlay
  densities spaced geometrically between ``density_min`` and ``density_max``.
* ``blocksparse``: every listed block shape that divides the weight times a geometric grid of
  block densities between ``density_min`` and ``density_max``.

Every compressed candidate must store fewer bytes than the dense weight; candidates whose counts
coincide (two densities rounding to the same number of kept entries) are kept once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sympy
import torch

from ..formats import BlockSparseSpec, DenseSpec, DopedSpec, FormatSpec, KroneckerSpec, LowRankSpec, Shape
from ..formats.sparse_index import count_kept
from ..policies.choices import (
    BlockSparseChoice,
    DenseChoice,
    DopedChoice,
    FormatChoice,
    KroneckerChoice,
    LowRankChoice,
)
from .options import SearchOptions


class PlanningError(ValueError):
    """A site's allowed formats give the planner nothing to choose from."""


@dataclass(frozen=True)
class Candidate:
    """One concrete format for one site, priced exactly; the estimate and damage come later."""

    spec: FormatSpec
    nbytes: int
    """Stored bytes, values and indices."""
    nparams: int
    """Stored values (indices excluded)."""
    choice: int = 0
    """Index of the `FormatChoice` in the site's space that produced this candidate."""
    error: float | None = None
    """Estimated relative error ``||W - W'|| / ||W||`` (weight or data-aware), see `estimate`."""
    damage: float | None = None
    """What the solver minimises summed over sites (absolute squared error, see `planner`)."""

    def cost(self, key: str) -> int:
        return self.nbytes if key == "bytes" else self.nparams


def _itemsize(dtype: torch.dtype | int) -> int:
    return dtype if isinstance(dtype, int) else torch.empty((), dtype=dtype).element_size()


def geometric(lo: float, hi: float, count: int) -> list[float]:
    """``count`` values spaced geometrically from ``lo`` to ``hi`` (just ``hi`` when ``count`` is 1)."""
    if count <= 1 or lo >= hi:
        return [hi]
    return [float(v) for v in np.geomspace(lo, hi, count)]


def max_saving_rank(shape: Shape) -> int:
    """Largest rank whose factors store fewer values than the dense matrix."""
    m, n = shape
    return min(m, n, (m * n - 1) // (m + n))


def lowrank_ranks(shape: Shape, choice: LowRankChoice) -> list[int]:
    """Ranks a low-rank choice allows on ``shape`` that save bytes."""
    cap = max_saving_rank(shape)
    if choice.rank_max is not None:
        cap = min(cap, choice.rank_max)
    step = choice.rank_multiple
    ranks = {choice.rank_min, *range(step * math.ceil(choice.rank_min / step), cap + 1, step)}
    return sorted(r for r in ranks if choice.rank_min <= r <= cap)


def divisor_pairs(shape: Shape, min_factor: int = 1) -> list[tuple[int, int]]:
    """Every ``a_shape = (m1, n1)`` with ``m1 | out`` and ``n1 | in`` and all four sides >= ``min_factor``."""
    m, n = shape
    return [
        (int(m1), int(n1))
        for m1 in sympy.divisors(m)
        for n1 in sympy.divisors(n)
        if min(m1, n1, m // m1, n // n1) >= min_factor
    ]


def _squareness(shape: Shape, pair: tuple[int, int]) -> float:
    (m, n), (m1, n1) = shape, pair
    return abs(math.log(m1 / n1)) + abs(math.log((m // m1) / (n // n1)))


def factor_shapes(shape: Shape, min_factor: int = 2, limit: int | None = 8) -> list[tuple[int, int]]:
    """Kronecker first-factor shapes to try on ``shape`` (``a_shapes: auto``), at most ``limit``.

    A term with ``A`` of ``p = m1 n1`` values and ``B`` of ``q = m n / p`` stores ``p + q`` values,
    so the size of ``A`` sets how much a term costs: the balanced split (``p ~ q ~ sqrt(m n)``) is the
    cheapest, lopsided splits cost up to ``m n / 2`` per term. Only splits where one term saves bytes
    are kept. A 576x1536 weight has a few hundred such pairs, too many to analyse per site, so when
    there are more than ``limit`` the selection is **spread over log p**: ``limit`` targets spaced
    evenly in ``log p`` from the smallest to the largest ``p``; the one nearest the centre gets the
    most balanced pair, every other the nearest pair not yet taken (ties go to the pair whose ``A``
    and ``B`` are closest to square, then the smaller ``(m1, n1)``). Picking only the most
    balanced pairs would be cheaper to analyse but, with ``terms_max = 4``, could only reach very
    high ratios (4 balanced terms of a 576x576 weight are about 72x smaller than dense); spreading
    covers every compression level with some Kronecker candidate. Pairs with the same ``p`` differ
    only in aspect ratio, the less useful distinction.
    """
    return list(_factor_shapes((int(shape[0]), int(shape[1])), min_factor, limit))


@functools.lru_cache(maxsize=1024)
def _factor_shapes(shape: Shape, min_factor: int, limit: int | None) -> tuple[tuple[int, int], ...]:
    m, n = shape
    pairs = [p for p in divisor_pairs(shape, min_factor) if p[0] * p[1] + (m * n) // (p[0] * p[1]) < m * n]
    if limit is None or len(pairs) <= limit:
        return tuple(sorted(pairs))
    logp = {p: math.log(p[0] * p[1]) for p in pairs}
    center = 0.5 * math.log(m * n)
    chosen = [min(pairs, key=lambda p: (abs(logp[p] - center), _squareness(shape, p), p))]
    targets = [float(t) for t in np.linspace(min(logp.values()), max(logp.values()), limit)]
    targets.remove(min(targets, key=lambda t: abs(t - center)))  # the balanced pair serves it
    for target in targets:
        rest = [p for p in pairs if p not in chosen]
        chosen.append(min(rest, key=lambda p: (abs(logp[p] - target), _squareness(shape, p), p)))
    return tuple(sorted(chosen))


def most_balanced(shape: Shape, pairs: Sequence[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """The ``count`` pairs with the cheapest terms (``A`` and ``B`` closest in size)."""
    m, n = shape
    key = lambda p: (p[0] * p[1] + (m * n) // (p[0] * p[1]), _squareness(shape, p), p)  # noqa: E731
    return sorted(sorted(pairs, key=key)[:count])


def _kron_shapes(shape: Shape, a_shapes: object, min_factor: int, limit: int) -> list[tuple[int, int]]:
    if a_shapes == "auto":
        return factor_shapes(shape, min_factor, limit)
    out = []
    for m1, n1 in a_shapes:  # type: ignore[attr-defined]
        if m1 >= 1 and n1 >= 1 and shape[0] % m1 == 0 and shape[1] % n1 == 0:
            out.append((int(m1), int(n1)))
    return out


def _kron_specs(shape: Shape, pairs: Sequence[tuple[int, int]], terms_max: int) -> list[KroneckerSpec]:
    m, n = shape
    specs = []
    for m1, n1 in pairs:
        bound = min(m1 * n1, (m // m1) * (n // n1))
        specs += [KroneckerSpec(a_shape=(m1, n1), terms=t) for t in range(1, min(terms_max, bound) + 1)]
    return specs


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
            pairs = _kron_shapes(shape, choice.a_shapes, choice.min_factor, options.kron_shapes)
        return list(_kron_specs(shape, pairs, choice.terms_max))
    step = choice.rank_multiple
    cap = max(1, max_saving_rank(shape) // 2)
    if cap < step:
        ranks = [cap]
    else:
        ranks = sorted({step * round(v) for v in geometric(1.0, cap / step, options.doped_ranks)})
    return [LowRankSpec(rank=r) for r in ranks if 1 <= r <= min(shape)]


def site_candidates(
    shape: Shape,
    dtype: torch.dtype | int,
    choices: Sequence[FormatChoice],
    options: SearchOptions | None = None,
) -> list[Candidate]:
    """Every candidate the ``choices`` allow for a weight of ``shape`` whose values are ``dtype``.

    Raises `PlanningError` when the choices leave nothing (e.g. only block shapes that do not divide).
    """
    options = options or SearchOptions()
    shape = (int(shape[0]), int(shape[1]))
    itemsize = _itemsize(dtype)
    dense_bytes = shape[0] * shape[1] * itemsize
    seen: dict[FormatSpec, Candidate] = {}

    def add(spec: FormatSpec, index: int, *, always: bool = False) -> None:
        nbytes = spec.nbytes(shape, itemsize)
        if (always or nbytes < dense_bytes) and spec not in seen:
            seen[spec] = Candidate(spec=spec, nbytes=nbytes, nparams=spec.nparams(shape), choice=index)

    for index, choice in enumerate(choices):
        if isinstance(choice, DenseChoice):
            add(DenseSpec(), index, always=True)
        elif isinstance(choice, LowRankChoice):
            for r in lowrank_ranks(shape, choice):
                add(LowRankSpec(rank=r), index)
        elif isinstance(choice, KroneckerChoice):
            pairs = _kron_shapes(shape, choice.a_shapes, choice.min_factor, options.kron_shapes)
            for spec in _kron_specs(shape, pairs, choice.terms_max):
                add(spec, index)
        elif isinstance(choice, DopedChoice):
            total = shape[0] * shape[1]
            densities = geometric(choice.density_min, choice.density_max, choice.densities)
            for base in doped_bases(shape, choice, options):
                kept: set[int] = set()
                for d in densities:
                    nnz = count_kept(d, total)
                    if nnz in kept or (base is None and nnz == 0):
                        continue
                    kept.add(nnz)
                    add(DopedSpec(base=base, density=d), index)
        elif isinstance(choice, BlockSparseChoice):
            for block in choice.blocks:
                if block[0] < 1 or block[1] < 1 or shape[0] % block[0] or shape[1] % block[1]:
                    continue
                grid = (shape[0] // block[0]) * (shape[1] // block[1])
                kept = set()
                for d in geometric(choice.density_min, choice.density_max, options.block_densities):
                    nblocks = max(1, count_kept(d, grid))
                    if nblocks not in kept:
                        kept.add(nblocks)
                        add(BlockSparseSpec(block=(int(block[0]), int(block[1])), density=d), index)
        else:  # pragma: no cover - the FormatChoice union is closed
            raise PlanningError(f"unknown format choice {choice!r}")
    if not seen:
        kinds = ", ".join(c.kind for c in choices) or "none"
        raise PlanningError(
            f"no candidate format for a {shape[0]}x{shape[1]} weight: the allowed formats ({kinds}) have no "
            "setting that divides this shape and stores fewer bytes than dense; allow 'dense' or other formats"
        )
    return list(seen.values())
