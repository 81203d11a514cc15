"""Block-sparse ``W`` (stored blocks at grid positions) applied from the stored blocks only."""

from __future__ import annotations

import torch
from torch import Tensor


def blocksparse_apply(x: Tensor, blocks: Tensor, rows: Tensor, cols: Tensor, out_features: int) -> Tensor:
    """``x @ W.T`` from the stored blocks only: one batched matmul, scattered into block rows (reference)."""
    _, bh, bw = blocks.shape
    gr, gc = out_features // bh, x.shape[-1] // bw
    lead = x.shape[:-1]
    xs = x.reshape(-1, gc, bw)[:, cols].transpose(0, 1)  # (nnzb, T, bw)
    part = torch.bmm(xs, blocks.transpose(1, 2))  # (nnzb, T, bh)
    out = part.new_zeros(gr, part.shape[1], bh).index_add(0, rows, part)
    return out.permute(1, 0, 2).reshape(*lead, gr * bh)
