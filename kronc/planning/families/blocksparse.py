"""Block sparsity on the planning side: block shapes x block densities, every density's error from sorted
block norms (a per-block-row quadratic form data-aware), the data-aware fit."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ...formats import BlockSparse, BlockSparseSpec, FormatSpec, Shape
from ...formats.sparse_index import count_kept
from ..estimate import F64, SiteAnalysis
from ..options import SearchOptions
from ..shapes import geometric
from ..whiten import column_scale, damped
from .base import Choice, Family
from .doped import largest

CHUNK = 1 << 22
"""Elements of the largest temporary in the data-aware pass (`block_gram`)."""


class BlockSparseChoice(Choice):
    """Keep the blocks with the largest norms."""

    kind: Literal["blocksparse"] = "blocksparse"
    """Format tag: ``blocksparse``."""
    blocks: list[tuple[int, int]] = Field(default_factory=lambda: [(32, 32), (16, 16)])
    """Block shapes (rows, cols) to try; a shape that does not divide a weight is skipped for it."""
    density_min: float = Field(default=0.02, gt=0, le=1)
    """Smallest fraction of blocks kept."""
    density_max: float = Field(default=0.9, gt=0, le=1)
    """Largest fraction of blocks kept."""

    @model_validator(mode="after")
    def _ordered(self) -> BlockSparseChoice:
        if self.density_max < self.density_min:
            raise ValueError(f"density_max ({self.density_max}) must be >= density_min ({self.density_min})")
        return self

    def describe(self) -> str:
        blocks = ",".join(f"{r}x{c}" for r, c in self.blocks)
        return f"blocksparse({blocks}, density {self.density_min:g}-{self.density_max:g})" + self.precision_note()


def blocksparse_errors(an: SiteAnalysis, block: tuple[int, int], kept: Sequence[int]) -> dict[int, float]:
    """Errors of keeping the ``kept`` blocks with the largest Frobenius norms."""
    (m, n), (bh, bw) = an.shape, block
    gr, gc = m // bh, n // bw
    norms = an.w32.reshape(gr, bh, gc, bw).to(F64).square().sum((1, 3)).flatten()  # row-major grid
    if an.data:  # data-aware ranking, as `fit_site` does it: norms of W * sqrt(diag H)
        scaled = an.w32.to(F64) * an.input_scale()
        ranked = scaled.reshape(gr, bh, gc, bw).square().sum((1, 3)).flatten().float()
    else:
        ranked = norms.float()
    order = torch.argsort(ranked, descending=True, stable=True)
    if not an.data:
        tails = an.total - torch.cat([torch.zeros(1, dtype=F64), norms[order].cumsum(0)])
        return {k: an.rel(tails[k]) for k in kept}
    g = block_gram(an, block)
    out = {}
    for k in kept:
        dropped = torch.ones(gr * gc, dtype=F64)
        dropped[order[:k]] = 0
        d = dropped.reshape(gr, gc)
        out[k] = an.rel(float(torch.einsum("ij,ijk,ik->", d, g, d)))
    return out


def block_gram(an: SiteAnalysis, block: tuple[int, int]) -> Tensor:
    """``g[I, J, K] = <W_IJ H_JK, W_IK>`` over the block grid (float32 products, float64 result).

    Built from an already computed finer grid when one divides this one (sums of its entries),
    else in one pass of ``W H`` split by column block.
    """
    (m, n), (bh, bw) = an.shape, block
    gr, gc = m // bh, n // bw
    for (fh, fw), fine in an.grams.items():
        if bh % fh == 0 and bw % fw == 0:
            rh, rw = bh // fh, bw // fw
            return fine.reshape(gr, rh, gc, rw, gc, rw).sum((1, 3, 5))
    assert an.h is not None
    if an.h32 is None:
        an.h32 = an.h.float()
    wb32, hb = an.w32.reshape(gr, bh, gc, bw), an.h32.reshape(gc, bw, n)
    g = torch.empty(gr, gc, gc, dtype=F64)
    step = max(1, CHUNK // (m * n))
    for j0 in range(0, gc, step):
        j1 = min(gc, j0 + step)
        wj = wb32[:, :, j0:j1, :].permute(2, 0, 1, 3).reshape(j1 - j0, m, bw)
        x = torch.bmm(wj, hb[j0:j1]).reshape(j1 - j0, gr, bh, gc, bw)
        g[:, j0:j1, :] = torch.einsum("jirkb,irkb->ijk", x, wb32)
    an.grams[block] = g
    return g


class BlockSparseFamily(Family):
    kind = "blocksparse"
    choice = BlockSparseChoice

    def structures(self, shape: Shape, choice: Choice, options: SearchOptions) -> Iterable[FormatSpec]:
        assert isinstance(choice, BlockSparseChoice)
        for block in choice.blocks:
            if block[0] < 1 or block[1] < 1 or shape[0] % block[0] or shape[1] % block[1]:
                continue
            grid = (shape[0] // block[0]) * (shape[1] // block[1])
            kept: set[int] = set()
            for d in geometric(choice.density_min, choice.density_max, options.block_densities):
                nblocks = max(1, count_kept(d, grid))
                if nblocks not in kept:
                    kept.add(nblocks)
                    yield BlockSparseSpec(block=(int(block[0]), int(block[1])), density=d)

    def errors(self, analysis: SiteAnalysis, specs: Sequence[FormatSpec]) -> list[float]:
        blocks: dict[tuple[int, int], set[int]] = {}
        for s in specs:
            assert isinstance(s, BlockSparseSpec)
            blocks.setdefault(s.block, set()).add(s.nblocks(analysis.shape))
        finest_first = sorted(blocks, key=lambda b: (b[0] * b[1], b))  # coarser grids reuse finer Grams
        found = {b: blocksparse_errors(analysis, b, sorted(blocks[b])) for b in finest_first}
        return [found[s.block][s.nblocks(analysis.shape)] for s in specs]  # type: ignore[attr-defined]

    def fit(self, weight: Tensor, spec: FormatSpec, moments: Tensor | None, damping: float) -> BlockSparse:
        scale = None if moments is None else column_scale(damped(moments, damping))
        return BlockSparse.fit(weight, spec, column_scale=scale)

    def uniform(self, shape: Shape, itemsize: int, cap: float, options: SearchOptions) -> list[FormatSpec]:
        m, n = shape
        specs: list[FormatSpec] = []
        for bh, bw in BlockSparseChoice().blocks:
            if m % bh or n % bw:
                continue
            grid = (m // bh) * (n // bw)

            def fits(k: int, bh: int = bh, bw: int = bw, grid: int = grid) -> bool:
                return BlockSparseSpec(block=(bh, bw), density=k / grid).nbytes(shape, itemsize) <= cap

            k = largest(fits, grid)
            if k >= 1:
                specs.append(BlockSparseSpec(block=(bh, bw), density=k / grid))
        return specs

