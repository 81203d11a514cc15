"""A sparse matrix of values at kept positions, applied by gather and scatter-add."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..codegen import ops as _ops  # noqa: F401  (registers the torch.ops.kronc.* ops used below)
from ..reference.sparse import gather_row_entries
from .sparse_index import SparseIndex


class SparseOverlay(nn.Module):
    """``values`` at the positions of ``index`` in an ``(out, in)`` matrix; zero elsewhere."""

    def __init__(self, index: SparseIndex, values: Tensor) -> None:
        super().__init__()
        if values.shape != (index.nnz,):
            raise ValueError(f"overlay needs {index.nnz} values, got shape {tuple(values.shape)}")
        self.index = index
        self.values = nn.Parameter(values.contiguous())

    @classmethod
    def from_dense(cls, matrix: Tensor, mask: Tensor) -> SparseOverlay:
        index = SparseIndex.from_mask(mask)
        rows, cols = index.decode()
        return cls(index, matrix.detach()[rows, cols].clone())

    @property
    def shape(self) -> tuple[int, int]:
        return self.index.grid

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        rows, cols = self.index.decode()
        return torch.ops.kronc.sparse_linear(x, rows, cols, self.values, self.shape[0], bias)

    def rows(self, index: Tensor) -> Tensor:
        rows, cols = self.index.decode()
        flat = index.reshape(-1)
        query, entry = gather_row_entries(rows, self.shape[0], flat)
        out = self.values.new_zeros(flat.numel(), self.shape[1])
        out = out.index_put((query, cols[entry]), self.values[entry])
        return out.reshape(*index.shape, self.shape[1])

    def to_dense(self) -> Tensor:
        rows, cols = self.index.decode()
        out = self.values.new_zeros(self.shape)
        return out.index_put((rows, cols), self.values)
