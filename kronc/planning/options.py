"""Knobs of the planner's search that a policy does not set: how wide and how fine it looks."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SearchOptions:
    """How many candidates the planner enumerates per site and how it measures them.

    The defaults keep the analysis of a 135M-parameter model within a short wait on a small CPU
    (``benchmarks/search_speed.py``; ``benchmarks/results/design_measurements.md``, "search speed"); raise them for a wider search on
    bigger machines.
    """

    kron_shapes: int = 8
    """With ``a_shapes: auto``, how many Kronecker factor shapes to try per site (spread over the
    range of parameter counts, see `candidates.factor_shapes`)."""
    doped_shapes: int = 2
    """With a doped Kronecker base and ``a_shapes: auto``, how many factor shapes to try as base."""
    doped_ranks: int = 4
    """With a doped low-rank base, how many base ranks to try (spaced geometrically)."""
    block_densities: int = 16
    """Block-sparse densities tried per block shape, spaced geometrically from min to max."""
    damping: float = 0.01
    """Data-aware metric: ``H + damping * mean(diag H) * I`` replaces ``H`` (keeps it invertible)."""
    dp_grid: int = 512
    """Solver: capacity cells of the knapsack DP that spends what the Lagrangian step leaves over."""
    workers: int = 0
    """Sites analysed at once, on threads; 0 means one per CPU core (at most 8). The analysis runs
    torch single-threaded (``torch.set_num_threads(1)`` for its duration, restored afterwards):
    the decompositions are mid-sized LAPACK calls that parallelise better across sites than inside
    one, single-threaded kernels do not stall when cores are shared with other jobs, and the
    numbers (hence the plan) do not depend on the worker count or the caller's thread setting."""

    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else max(1, min(8, os.cpu_count() or 1))
