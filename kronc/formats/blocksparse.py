"""Block sparse: the weight cut into ``(bh, bw)`` blocks, only the blocks with the largest norms kept.

Stores ``round(density * blocks)`` dense blocks and their grid positions (bitmap or compressed
rows, whichever is smaller). Applied as one batched matmul over the stored blocks, scattered into
the output rows; missing blocks cost nothing.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..codegen import ops as _ops  # noqa: F401  (registers the torch.ops.kronc.* ops used below)
from ..reference.sparse import gather_row_entries
from .base import Factorized, FormatError, FormatSpec, Layout, Shape, check_matrix
from .registry import register_format
from .sparse_index import SparseIndex, count_kept, index_bytes, placeholder_index


class BlockSparseSpec(FormatSpec):
    """Keep a ``density`` fraction of ``block``-shaped tiles, chosen by Frobenius norm."""

    kind: Literal["blocksparse"] = "blocksparse"
    block: tuple[int, int] = Field(description="Block shape (rows, cols); must divide the weight's shape.")
    density: float = Field(gt=0.0, le=1.0, description="Fraction of blocks kept.")

    def grid(self, shape: Shape) -> Shape:
        return shape[0] // self.block[0], shape[1] // self.block[1]

    def check(self, shape: Shape) -> None:
        bh, bw = self.block
        if bh < 1 or bw < 1 or shape[0] % bh or shape[1] % bw:
            raise FormatError(f"blocksparse block={self.block} does not divide a {shape[0]}x{shape[1]} weight")
        self.check_precision(shape)

    def stored_values(self, shape: Shape) -> dict[str, tuple[tuple[int, ...], Layout]]:
        """One row of codes per stored block."""
        return {"blocks": ((self.nblocks(shape), *self.block), "flat")}

    def nblocks(self, shape: Shape) -> int:
        gr, gc = self.grid(shape)
        return max(1, count_kept(self.density, gr * gc))

    def nparams(self, shape: Shape) -> int:
        return self.nblocks(shape) * self.block[0] * self.block[1]

    def nbytes(self, shape: Shape, itemsize: int) -> int:
        return self.values_bytes(shape, itemsize) + index_bytes(self.grid(shape), self.nblocks(shape))[1]

    def flops_per_token(self, shape: Shape) -> int:
        return 2 * self.nparams(shape)

    def describe(self) -> str:
        return f"block({self.block[0]}x{self.block[1]}@{self.density:.4g}){self.precision_tag()}"


class BlockSparse(Factorized):
    spec_type = BlockSparseSpec
    factored_overhead = 8.0  # measured: kronc.formats.training

    def __init__(self, index: SparseIndex, blocks: Tensor, spec: BlockSparseSpec) -> None:
        bh, bw = spec.block
        super().__init__(spec, (index.grid[0] * bh, index.grid[1] * bw))
        if blocks.shape != (index.nnz, bh, bw):
            raise FormatError(f"blocksparse needs blocks of shape {(index.nnz, bh, bw)}, got {tuple(blocks.shape)}")
        self.index = index
        self.put("blocks", blocks)

    @classmethod
    def fit(cls, weight: Tensor, spec: FormatSpec, column_scale: Tensor | None = None) -> BlockSparse:
        """Keep the blocks with the largest Frobenius norms (of ``W * column_scale`` when given:
        the data-aware ranking, with ``column_scale = sqrt(diag E[x xᵀ])``)."""
        assert isinstance(spec, BlockSparseSpec)
        check_matrix(weight)
        shape: Shape = tuple(weight.shape)  # type: ignore[assignment]
        spec.check(shape)
        tiles = to_blocks(weight.detach(), spec.block)  # (gr, gc, bh, bw)
        if column_scale is None:
            norms = tiles.float().pow(2).sum((2, 3)).flatten()
        else:
            scaled = to_blocks(weight.detach().to(torch.float64) * column_scale.to(weight.device), spec.block)
            norms = scaled.square().sum((2, 3)).flatten().float()
        keep = torch.argsort(norms, descending=True, stable=True)[: spec.nblocks(shape)]
        mask = torch.zeros_like(norms, dtype=torch.bool)
        mask[keep] = True
        index = SparseIndex.from_mask(mask.reshape(spec.grid(shape)))
        rows, cols = index.decode()
        return cls(index, tiles[rows, cols].clone(), spec)

    @classmethod
    def empty(cls, spec: FormatSpec, shape: Shape, dtype: torch.dtype) -> BlockSparse:
        assert isinstance(spec, BlockSparseSpec)
        n = spec.nblocks(shape)
        return cls(placeholder_index(spec.grid(shape), n), torch.zeros(n, *spec.block, dtype=dtype), spec)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        rows, cols = self.index.decode()
        return torch.ops.kronc.blocksparse_linear(x, self.value("blocks", x.dtype), rows, cols, self.shape[0], bias)

    def rows(self, index: Tensor) -> Tensor:
        rows, cols = self.index.decode()
        blocks = self.value("blocks")
        (gr, gc), (bh, bw) = self.index.grid, blocks.shape[1:]
        flat = index.reshape(-1)
        query, entry = gather_row_entries(rows, gr, flat // bh)
        out = blocks.new_zeros(flat.numel(), gc, bw)
        out = out.index_put((query, cols[entry]), blocks[entry, flat[query] % bh])
        return out.reshape(*index.shape, gc * bw)

    def to_dense(self) -> Tensor:
        rows, cols = self.index.decode()
        blocks = self.value("blocks")
        (gr, gc), (bh, bw) = self.index.grid, blocks.shape[1:]
        tiles = blocks.new_zeros(gr, gc, bh, bw).index_put((rows, cols), blocks)
        return tiles.permute(0, 2, 1, 3).reshape(gr * bh, gc * bw)


def to_blocks(weight: Tensor, block: tuple[int, int]) -> Tensor:
    """``(out, in)`` to ``(out/bh, in/bw, bh, bw)`` tiles."""
    (m, n), (bh, bw) = weight.shape, block
    if m % bh or n % bw:
        raise FormatError(f"block {block} does not divide a {m}x{n} weight")
    return weight.reshape(m // bh, bh, n // bw, bw).permute(0, 2, 1, 3)


register_format(BlockSparse)
