"""Tests of `kronc.formats.sparse_index`: both encodings, sizes, ordering and module moves."""

from __future__ import annotations

import math

import pytest
import torch

import kronc.formats.sparse_index as si
from kronc.formats import SparseIndex, SparseOverlay, index_bytes
from kronc.formats.sparse_index import count_kept


def random_mask(grid: tuple[int, int], nnz: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    mask[torch.randperm(mask.numel(), generator=g)[:nnz]] = True
    return mask.reshape(grid)


def forced(monkeypatch: pytest.MonkeyPatch, encoding: str) -> None:
    """Make `SparseIndex` pick ``encoding`` whatever the sizes say."""
    monkeypatch.setattr(si, "index_bytes", lambda grid, nnz: (encoding, -1))


def shuffled_positions(mask: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    perm = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(seed))
    return rows[perm], cols[perm]


# Grids with a cell count that is not a multiple of 8, empty rows, entries in the last cell, etc.
GRIDS = [((3, 5), 0), ((3, 5), 1), ((3, 5), 7), ((3, 5), 15), ((1, 9), 4), ((9, 1), 4), ((17, 23), 40), ((40, 6), 5)]


@pytest.mark.parametrize(("grid", "nnz"), GRIDS)
def test_both_encodings_decode_same_row_major_positions(monkeypatch, grid, nnz) -> None:
    mask = random_mask(grid, nnz, seed=grid[0] * 31 + nnz)
    if nnz:
        mask[-1, -1] = True  # last cell (last bit of the last, possibly partial, byte)
        mask[0, 0] = True
    expect_r, expect_c = torch.nonzero(mask, as_tuple=True)  # row-major order
    rows, cols = shuffled_positions(mask)
    decoded = {}
    for enc in ("bitmap", "csr"):
        with monkeypatch.context() as mp:
            forced(mp, enc)
            idx = SparseIndex(grid, rows, cols)
        assert idx.encoding == enc and idx.nnz == expect_r.numel()
        r, c = idx.decode()
        assert r.dtype == torch.int64 and c.dtype == torch.int64
        assert torch.equal(r, expect_r) and torch.equal(c, expect_c)
        assert torch.equal(idx.mask(), mask)
        decoded[enc] = (r, c)
    assert torch.equal(decoded["bitmap"][0], decoded["csr"][0])
    assert torch.equal(decoded["bitmap"][1], decoded["csr"][1])


def test_stored_buffers_of_each_encoding(monkeypatch) -> None:
    grid = (4, 10)
    mask = torch.zeros(grid, dtype=torch.bool)
    mask[0, 3] = mask[0, 9] = mask[2, 0] = mask[3, 9] = True  # row 1 is empty
    with monkeypatch.context() as mp:
        forced(mp, "csr")
        csr = SparseIndex.from_mask(mask)
    assert csr.crow.dtype == torch.int32 and csr.crow.tolist() == [0, 2, 2, 3, 4]
    assert csr.col.dtype == torch.int16 and csr.col.tolist() == [3, 9, 0, 9]
    assert not hasattr(csr, "bitmap")
    with monkeypatch.context() as mp:
        forced(mp, "bitmap")
        bm = SparseIndex.from_mask(mask)
    assert bm.bitmap.dtype == torch.uint8 and bm.bitmap.numel() == 5  # ceil(40 / 8)
    # cells 3, 9, 20, 39: MSB-first bits within each byte
    assert bm.bitmap.tolist() == [0b00010000, 0b01000000, 0b00001000, 0, 0b00000001]
    assert not hasattr(bm, "crow")


@pytest.mark.parametrize(("grid", "nnz"), [((48, 64), n) for n in (0, 1, 93, 94, 95, 3072)] + [((3, 5), 2), ((2, 40000), 3)])
def test_automatic_choice_is_the_smaller_and_matches_buffers(grid, nnz) -> None:
    idx = SparseIndex.from_mask(random_mask(grid, nnz, seed=nnz))
    enc, size = index_bytes(grid, nnz)
    col_bytes = 2 if grid[1] <= 32767 else 4
    bitmap, csr = math.ceil(grid[0] * grid[1] / 8), 4 * (grid[0] + 1) + col_bytes * nnz
    assert size == min(bitmap, csr)
    assert enc == ("bitmap" if bitmap <= csr else "csr")
    assert idx.encoding == enc
    assert sum(b.numel() * b.element_size() for b in idx.buffers()) == size


def test_encoding_switches_once_as_density_rises() -> None:
    grid = (16, 48)  # bitmap 96 bytes; csr 68 + 2 nnz -> csr up to 13, bitmap from 14 on
    encs = [index_bytes(grid, n)[0] for n in range(0, 16 * 48 + 1)]
    switch = encs.index("bitmap")
    assert switch == 14
    assert set(encs[:switch]) == {"csr"} and set(encs[switch:]) == {"bitmap"}


def test_count_kept_rounds_and_clamps() -> None:
    assert count_kept(0.0, 100) == 0
    assert count_kept(0.125, 100) == 12  # 12.5 -> 12 (ties to even)
    assert count_kept(0.135, 100) == 14
    assert count_kept(1.0, 100) == 100
    assert count_kept(93 / 3072, 3072) == 93


@pytest.mark.parametrize("nnz", [3, 60])  # csr, bitmap
def test_to_float64_keeps_decode_and_invalidates_cache(nnz) -> None:
    grid = (4, 64)  # bitmap 32 bytes; csr 20 + 2 nnz
    mask = random_mask(grid, nnz, seed=5)
    values = torch.randn(nnz, generator=torch.Generator().manual_seed(6))
    ov = SparseOverlay(SparseIndex.from_mask(mask), values)
    enc = ov.index.encoding
    assert enc == ("csr" if nnz == 3 else "bitmap")
    first = ov.index.decode()
    assert ov.index.decode() is first  # cached
    dense32 = ov.to_dense().detach()
    ov = ov.to(torch.float64)
    assert ov.index.encoding == enc
    for b in ov.index.buffers():
        assert not b.is_floating_point()
    again = ov.index.decode()
    assert again is not first  # the move dropped the cached copy
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert ov.values.dtype == torch.float64
    dense64 = ov.to_dense()
    assert dense64.dtype == torch.float64 and torch.equal(dense64.float(), dense32)
    x = torch.randn(2, 3, grid[1], dtype=torch.float64)
    assert torch.allclose(ov(x), x @ dense64.T, rtol=1e-12, atol=1e-12)
    idx = torch.tensor([[3, 0, 3], [2, 2, 1]])
    assert torch.equal(ov.rows(idx), dense64[idx])


def test_sparse_overlay_forward_chunks(monkeypatch) -> None:
    # Force several token chunks through the gather/scatter loop.
    import kronc.reference.sparse as ref

    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 20)
    mask = random_mask((6, 9), 10, seed=7)
    ov = SparseOverlay.from_dense(torch.randn(6, 9, dtype=torch.float64), mask)
    x = torch.randn(7, 9, dtype=torch.float64)  # step = 2 tokens -> 4 chunks
    assert torch.allclose(ov(x), x @ ov.to_dense().T, rtol=1e-12, atol=1e-12)


def test_overlay_rejects_wrong_value_count() -> None:
    idx = SparseIndex.from_mask(random_mask((4, 4), 3))
    with pytest.raises(ValueError, match="3 values"):
        SparseOverlay(idx, torch.zeros(4))
