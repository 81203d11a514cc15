"""Sparse ``S`` (values at kept positions) applied by gather and scatter-add, and row lookups."""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24
"""Bound on tokens x nnz materialised at once by `overlay_apply`."""


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
    step = max(1, CHUNK_ELEMENTS // max(1, values.numel()))
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


