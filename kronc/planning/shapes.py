"""Shape arithmetic the planning families share: geometric grids, break-even ranks, Kronecker factor shapes."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import sympy
import torch

from ..formats import Shape


def itemsize(dtype: torch.dtype | int) -> int:
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
