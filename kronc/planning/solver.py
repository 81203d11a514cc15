"""The budget solver: one candidate per site, least total damage, total cost within the limit.

A multiple-choice knapsack. `solve` is the production solver, `solve_exact` a reference for tests.

**Algorithm** (`solve`):

1. Per site, drop dominated candidates (the Pareto front: cost up, damage strictly down) and take
   the lower convex hull of ``(cost, damage)``.
2. Lagrangian step. For a multiplier ``λ`` each site independently picks the hull point minimising
   ``damage + λ cost``; as ``λ`` falls from ∞ the picks move up each hull one segment at a time, in
   order of the segments' slopes ``Δdamage / Δcost``. Sorting every hull segment of every site by
   slope (ties: site, then segment order) therefore sweeps *all* multipliers at once — the exact
   result of bisecting on ``λ``, without the bisection. Starting from every site's cheapest
   candidate, segments are taken in that order until the first that does not fit.
3. Repair/upgrade. The budget left over (less than that first non-fitting segment) is spent by an
   exact knapsack DP over upgrades (a site moving to any costlier, less damaging candidate on its
   Pareto front, hull or not), with costs rounded *up* to ``unit = ceil(span / grid)``, ``span``
   being the cost from the starting plan to the next prefix plan. The DP runs from the last prefix
   plan and from the ``restarts`` plans before it (undoing a segment or two frees budget that a
   better mix of off-hull candidates may use); the least damaging result wins.

**Guarantees** (each tested in ``tests/planning/test_planning.py``):

* *Budget met*: step 2 only takes segments that fit, step 3 rounds costs up; the total never
  exceeds ``limit``. If even the cheapest candidates exceed it, `kronc.budget.BudgetError` says how
  small the plan can get.
* *Deterministic*: every sort has a total order (ties by site and candidate index); no randomness.
* *Near-optimal*: the plan after step 2 is an optimal solution of the LP relaxation at its own cost
  ``c_k``, so ``OPT(limit) >= LP(limit) >= d_k - g``, where ``g`` is the damage the first
  non-fitting segment would remove; the result is within ``g`` (usually far less after step 3) of
  the optimum. `lp_bound` computes ``LP(limit)`` so callers can report the gap.
* *Monotone in the budget*: a larger limit never gives more damage. Within one prefix interval
  ``c_k <= limit < c_{k+1}`` the starting plans and rounding units are fixed and each DP is exact
  for the rounded costs on a capacity that grows with ``limit``, so the best of them cannot get
  worse. Across an interval boundary, any plan costing less than ``c_{k+1}`` has damage at least
  ``LP(c_{k+1}) = d_{k+1}``, which the larger budget already reaches with the prefix alone.
  (Exact arithmetic; totals are compared as correctly rounded sums, ``math.fsum``.)

Cost: sorting the hull segments plus ``(restarts + 1)`` DPs of ``sites x upgrades x grid``
cells; about 0.1 s for 210 sites with ~130 candidates each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from ..budget import BudgetError

Key = Literal["bytes", "params"]


class Priced(Protocol):
    """What the solver reads from a candidate (`candidates.Candidate` has these)."""

    @property
    def nbytes(self) -> int: ...
    @property
    def nparams(self) -> int: ...
    @property
    def damage(self) -> float | None: ...


@dataclass(frozen=True)
class _Site:
    cost: np.ndarray  # int64, Pareto front in increasing cost
    damage: np.ndarray  # float64, strictly decreasing
    index: np.ndarray  # candidate index in the caller's table
    hull: np.ndarray  # positions in the front that are lower-convex-hull vertices


def _prices(table: Sequence[Priced], key: Key, site: int) -> tuple[np.ndarray, np.ndarray]:
    if not table:
        raise ValueError(f"site {site} has no candidates")
    cost = np.array([c.nbytes if key == "bytes" else c.nparams for c in table], dtype=np.int64)
    damage = np.array([np.nan if c.damage is None else c.damage for c in table], dtype=np.float64)
    if not np.all(np.isfinite(damage)) or np.any(damage < 0):
        raise ValueError(f"site {site}: every candidate needs a finite, non-negative damage")
    return cost, damage


def _front(cost: np.ndarray, damage: np.ndarray) -> _Site:
    order = np.lexsort((np.arange(cost.size), damage, cost))  # cost, then damage, then index
    keep: list[int] = []
    for i in order:
        if not keep or damage[i] < damage[keep[-1]]:
            keep.append(int(i))
    c, d = cost[keep], damage[keep]
    hull: list[int] = []
    for j in range(len(keep)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when the slope a->b is no steeper than b->j (b is on or above the chord a-j)
            if (d[a] - d[b]) * (c[j] - c[b]) <= (d[b] - d[j]) * (c[b] - c[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return _Site(c, d, np.array(keep, dtype=np.int64), np.array(hull, dtype=np.int64))


def _prefix(sites: list[_Site], limit: int) -> tuple[list[tuple[list[int], int]], tuple[int, float] | None]:
    """Lagrangian step: the chain of prefix plans ``(front positions, total cost)`` that fit, from the
    cheapest plan up to the last one, and the first segment ``(cost, damage removed)`` left out."""
    pos = [int(s.hull[0]) for s in sites]
    total = sum(int(s.cost[p]) for s, p in zip(sites, pos, strict=True))
    segments = []
    for i, s in enumerate(sites):
        key = -math.inf
        for j in range(len(s.hull) - 1):
            a, b = s.hull[j], s.hull[j + 1]
            dc, dd = int(s.cost[b] - s.cost[a]), float(s.damage[a] - s.damage[b])
            key = max(key, -dd / dc)  # hull slopes only flatten; guard against rounding
            segments.append((key, i, j, dc, dd, int(b)))
    segments.sort(key=lambda t: (t[0], t[1], t[2]))
    chain = [(list(pos), total)]
    for _, i, _, dc, dd, b in segments:
        if total + dc > limit:
            return chain, (dc, dd)
        pos[i] = b
        total += dc
        chain.append((list(pos), total))
    return chain, None


def _upgrade(sites: list[_Site], pos: list[int], room: int, span: int, grid: int) -> list[int]:
    """Exact DP over upgrades within ``room``, costs rounded up to ``ceil(span / grid)``."""
    unit = max(1, math.ceil(span / grid))
    cap = room // unit
    if cap <= 0:
        return pos
    best = np.zeros(cap + 1)
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
    for s, p in zip(sites, pos, strict=True):
        rest = np.arange(p + 1, s.cost.size)
        weight = -((s.cost[p] - s.cost[rest]) // unit)  # ceil division of the extra cost
        ok = weight <= cap
        rest, weight = rest[ok], weight[ok]
        if rest.size == 0:
            steps.append(None)
            continue
        gain = s.damage[p] - s.damage[rest]
        cells = np.arange(cap + 1)
        src = cells[None, :] - weight[:, None]
        value = np.where(src >= 0, best[np.clip(src, 0, cap)] + gain[:, None], -np.inf)
        pick = np.argmax(value, axis=0)  # first best option: deterministic
        top = value[pick, cells]
        take = top > best
        steps.append((take, pick, rest))
        best = np.where(take, top, best)
        del src, value
    out = list(pos)
    c = cap
    for i in range(len(sites) - 1, -1, -1):
        step = steps[i]
        if step is None or not step[0][c]:
            continue
        take, pick, rest = step
        j = int(rest[pick[c]])
        out[i] = j
        s = sites[i]
        c -= int(-((s.cost[pos[i]] - s.cost[j]) // unit))
    return out


def _prepare(tables: Sequence[Sequence[Priced]], limit: float, key: Key) -> tuple[list[_Site], int]:
    if key not in ("bytes", "params"):
        raise ValueError(f"key must be 'bytes' or 'params', got {key!r}")
    sites = [_front(*_prices(t, key, i)) for i, t in enumerate(tables)]
    smallest = sum(int(s.cost[0]) for s in sites)
    if smallest > limit:
        unit = "bytes" if key == "bytes" else "parameters"
        raise BudgetError(
            f"cannot fit in {math.floor(limit):,} {unit}: the smallest reachable total is {smallest:,} {unit} "
            f"(every site at its cheapest allowed candidate)"
        )
    return sites, math.floor(limit)


def solve(
    tables: Sequence[Sequence[Priced]], limit: float, key: Key = "bytes", *, grid: int = 512, restarts: int = 2
) -> list[int]:
    """Index of the chosen candidate in each table: least total damage with total cost <= ``limit``.

    ``key`` says which cost counts: ``nbytes`` or ``nparams``. ``grid`` is the resolution of the
    upgrade DP and ``restarts`` how many earlier prefix plans it also upgrades from (see the module
    docstring). Raises `BudgetError` naming the smallest reachable total
    when even the cheapest candidates exceed ``limit``.
    """
    sites, cap = _prepare(tables, limit, key)
    chain, nxt = _prefix(sites, cap)
    pos = chain[-1][0]
    if nxt is not None:
        end = chain[-1][1] + nxt[0]  # cost of the next prefix plan, just out of reach
        best = math.inf
        for start, start_cost in chain[-1 : -2 - restarts : -1]:
            plan = _upgrade(sites, start, cap - start_cost, end - start_cost, grid)
            damage = math.fsum(float(s.damage[p]) for s, p in zip(sites, plan, strict=True))
            if damage < best:
                best, pos = damage, plan
    return [int(s.index[p]) for s, p in zip(sites, pos, strict=True)]


def lp_bound(tables: Sequence[Sequence[Priced]], limit: float, key: Key = "bytes") -> float:
    """Optimum of the LP relaxation: no choice of one candidate per site within ``limit`` does better."""
    sites, cap = _prepare(tables, limit, key)
    chain, nxt = _prefix(sites, cap)
    pos, total = chain[-1]
    damage = math.fsum(float(s.damage[p]) for s, p in zip(sites, pos, strict=True))
    if nxt is not None:
        damage -= nxt[1] * (cap - total) / nxt[0]
    return damage


def total_damage(tables: Sequence[Sequence[Priced]], picks: Sequence[int]) -> float:
    return math.fsum(float(t[i].damage or 0.0) for t, i in zip(tables, picks, strict=True))


def total_cost(tables: Sequence[Sequence[Priced]], picks: Sequence[int], key: Key = "bytes") -> int:
    return sum((t[i].nbytes if key == "bytes" else t[i].nparams) for t, i in zip(tables, picks, strict=True))


def solve_exact(tables: Sequence[Sequence[Priced]], limit: float, key: Key = "bytes") -> list[int]:
    """Exact optimum by dynamic programming over Pareto-optimal partial plans (small cases: tests)."""
    _prepare(tables, limit, key)
    states: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for i, table in enumerate(tables):
        cost, damage = _prices(table, key, i)
        grown = [
            (c + int(cost[j]), d + float(damage[j]), (*picks, j))
            for c, d, picks in states
            for j in range(len(table))
            if c + int(cost[j]) <= limit
        ]
        grown.sort(key=lambda s: (s[0], s[1], s[2]))
        states = []
        for s in grown:
            if not states or s[1] < states[-1][1]:
                states.append(s)
    best = min(states, key=lambda s: (s[1], s[0], s[2]))
    return list(best[2])
