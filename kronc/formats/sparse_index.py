"""Positions of the kept entries of a sparse matrix (or of a grid of blocks), stored compactly.

Two encodings; a `SparseIndex` always uses the smaller one for its grid shape and entry count:

* ``bitmap``: one bit per grid cell, packed into ``ceil(rows * cols / 8)`` uint8 bytes;
* ``csr``: compressed rows, an int32 row pointer of ``rows + 1`` entries and one column index per
  kept entry (int16 when ``cols <= 32767``, else int32).

Kept entries are always listed in row-major order, so values stored beside the index line up with
``decode()``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

Encoding = Literal["bitmap", "csr"]


def _col_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32


def index_bytes(grid: tuple[int, int], nnz: int) -> tuple[Encoding, int]:
    """The smaller encoding for ``nnz`` kept cells of a ``grid`` and its exact size in bytes."""
    rows, cols = grid
    bitmap = math.ceil(rows * cols / 8)
    csr = 4 * (rows + 1) + nnz * _col_dtype(cols).itemsize
    return ("bitmap", bitmap) if bitmap <= csr else ("csr", csr)


def count_kept(density: float, total: int) -> int:
    """How many of ``total`` cells a ``density`` keeps (rounded to nearest, ties to even)."""
    return min(total, max(0, round(density * total)))


class SparseIndex(nn.Module):
    """Kept positions of a ``grid``, encoded as a bitmap or compressed rows (whichever is smaller)."""

    bitmap: Tensor  # the buffers of one encoding or the other
    crow: Tensor
    col: Tensor

    def __init__(self, grid: tuple[int, int], rows: Tensor, cols: Tensor) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        r, c = self.grid
        order = torch.argsort(rows.long() * c + cols.long())
        rows, cols = rows.long()[order], cols.long()[order]
        nnz = rows.numel()
        self.encoding, _ = index_bytes(self.grid, nnz)
        if self.encoding == "bitmap":
            bits = torch.zeros(r * c, dtype=torch.bool, device=rows.device)
            bits[rows * c + cols] = True
            self.register_buffer("bitmap", _pack_bits(bits))
        else:
            counts = torch.bincount(rows, minlength=r)
            crow = torch.zeros(r + 1, dtype=torch.int32, device=rows.device)
            crow[1:] = torch.cumsum(counts, 0).to(torch.int32)
            self.register_buffer("crow", crow)
            self.register_buffer("col", cols.to(_col_dtype(c)))
        self.nnz = nnz
        self._cache: tuple[Tensor, Tensor] | None = None

    @classmethod
    def from_mask(cls, mask: Tensor) -> SparseIndex:
        rows, cols = torch.nonzero(mask, as_tuple=True)
        return cls((mask.shape[0], mask.shape[1]), rows, cols)

    def decode(self) -> tuple[Tensor, Tensor]:
        """Row and column (int64) of every kept cell, in row-major order. Cached after first use."""
        if self._cache is not None and self._cache[0].device == self._device():
            return self._cache
        r, c = self.grid
        if self.encoding == "bitmap":
            flat = torch.nonzero(_unpack_bits(self.bitmap, r * c), as_tuple=True)[0]
            out = (flat // c, flat % c)
        else:
            counts = (self.crow[1:] - self.crow[:-1]).long()
            rows = torch.repeat_interleave(torch.arange(r, device=self.crow.device), counts)
            out = (rows, self.col.long())
        self._cache = out
        return out

    def mask(self) -> Tensor:
        rows, cols = self.decode()
        m = torch.zeros(self.grid, dtype=torch.bool, device=rows.device)
        m[rows, cols] = True
        return m

    def _device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def _apply(self, fn, recurse=True):
        self._cache = None  # device or dtype moves invalidate the decoded copy
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None  # loaded positions replace the decoded copy
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, nnz={self.nnz}, encoding={self.encoding}"


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack_bits(bits: Tensor) -> Tensor:
    n = bits.numel()
    padded = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits.to(torch.uint8)
    return (padded.view(-1, 8) * _BIT_WEIGHTS.to(bits.device)).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, n: int) -> Tensor:
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(-1)[:n]


def placeholder_index(grid: tuple[int, int], nnz: int) -> SparseIndex:
    """An index of ``nnz`` cells (the first ones, row-major): a stand-in that loading a state dict replaces."""
    flat = torch.arange(nnz)
    return SparseIndex(grid, flat // grid[1], flat % grid[1])
