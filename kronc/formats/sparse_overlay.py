"""A sparse matrix of values at kept positions, applied by gather and scatter-add."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..codegen import ops as _ops  # noqa: F401  (registers the torch.ops.kronc.* ops used below)
from .sparse_index import SparseIndex

_CHUNK_ELEMENTS = 1 << 24  # bound on tokens x nnz materialised at once


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


def overlay_apply(x: Tensor, rows: Tensor, cols: Tensor, values: Tensor, out_features: int, chunk: bool = True) -> Tensor:
    """``x @ S.T`` for ``S[rows[k], cols[k]] = values[k]``: gather ``x[:, cols]``, scatter-add into rows (reference).

    ``chunk`` bounds the ``tokens x nnz`` product materialised at once (off while tracing, where
    the token count may be symbolic).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    out = x2.new_zeros(x2.shape[0], out_features)
    if not chunk:
        return out.index_add(1, rows, x2[:, cols] * values).reshape(*lead, out_features)
    step = max(1, _CHUNK_ELEMENTS // max(1, values.numel()))
    for s in range(0, x2.shape[0], step):
        prod = x2[s : s + step, cols] * values
        out[s : s + step] = out[s : s + step].index_add(1, rows, prod)
    return out.reshape(*lead, out_features)


def gather_row_entries(entry_rows: Tensor, num_rows: int, query: Tensor) -> tuple[Tensor, Tensor]:
    """For row-major entries with rows ``entry_rows``, pair each query position with its row's entries.

    Returns ``(q, e)``: query position ``q[k]`` owns entry ``e[k]``.
    """
    counts = torch.bincount(entry_rows, minlength=num_rows)
    starts = torch.cumsum(counts, 0) - counts
    per_query = counts[query]
    q = torch.repeat_interleave(torch.arange(query.numel(), device=query.device), per_query)
    first = torch.cumsum(per_query, 0) - per_query
    offset = torch.arange(q.numel(), device=query.device) - first[q]
    return q, starts[query][q] + offset
