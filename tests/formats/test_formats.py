"""Tests of the five weight formats in `kronc.formats` against their shared interface.

Exactness checks run in float64 and use ``EXACT = 1e-10`` on the relative Frobenius error (the
factorisations are SVD based, so the error is a few ulps times a small condition factor, far
below this). Low-precision checks compare against a float64 reference built from the module's own
stored values: relative Frobenius error below ``LOW_TOL[dtype]`` (fp16: 5e-3, bf16: 3e-2, i.e.
a handful of units in the last place of each format).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

import kronc.formats as F
from kronc.formats import (
    BlockSparse,
    BlockSparseSpec,
    Dense,
    DenseSpec,
    Doped,
    DopedSpec,
    FormatError,
    Kronecker,
    KroneckerSpec,
    LowRank,
    LowRankSpec,
    parse_spec,
)
from kronc.formats.blocksparse import to_blocks
from kronc.formats.doped import row_balanced_mask, row_balanced_order, top_magnitude_mask
from kronc.reference.kronecker import kronecker_apply, rearrange

EXACT = 1e-10
LOW_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64).to(dtype)


def rel_err(approx: torch.Tensor, ref: torch.Tensor) -> float:
    approx, ref = approx.detach().double(), ref.detach().double()
    return float(torch.linalg.norm(approx - ref) / torch.linalg.norm(ref))


def fro(t: torch.Tensor) -> float:
    return float(torch.linalg.norm(t.detach().double()))


# One representative (spec, shape) per format and per storage variant; shared by the interface tests.
SHAPE = (12, 20)
CASES: list[tuple[str, F.FormatSpec, tuple[int, int]]] = [
    ("dense", DenseSpec(), SHAPE),
    ("lowrank", LowRankSpec(rank=3), SHAPE),
    ("kron-a-first", KroneckerSpec(a_shape=(3, 4), terms=2), SHAPE),
    ("kron-b-first", KroneckerSpec(a_shape=(12, 1), terms=1), SHAPE),
    ("kron-1xN", KroneckerSpec(a_shape=(1, 20), terms=1), SHAPE),
    ("doped-kron", DopedSpec(base=KroneckerSpec(a_shape=(2, 5), terms=2), density=0.05), SHAPE),
    ("doped-lowrank", DopedSpec(base=LowRankSpec(rank=2), density=0.05), SHAPE),
    ("doped-none-csr", DopedSpec(density=0.02), SHAPE),
    ("doped-none-bitmap", DopedSpec(density=0.5), SHAPE),
    ("doped-empty-overlay", DopedSpec(base=LowRankSpec(rank=1), density=0.0), SHAPE),
    ("block-bitmap", BlockSparseSpec(block=(4, 5), density=0.5), SHAPE),
    ("block-csr", BlockSparseSpec(block=(4, 2), density=10 / 2048), (16, 1024)),
]
CASE_IDS = [c[0] for c in CASES]


def fitted(spec: F.FormatSpec, shape: tuple[int, int], dtype: torch.dtype = F64, seed: int = 0) -> F.Factorized:
    return F.fit(randn(*shape, seed=seed, dtype=dtype), spec)


# --------------------------------------------------------------------------------------------------
# Exact-structure inputs come back exact


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_lowrank_exact_on_rank_r(rank: int) -> None:
    w = randn(30, rank, seed=1) @ randn(rank, 22, seed=2)
    m = LowRank.fit(w, LowRankSpec(rank=rank))
    assert m.u.shape == (30, rank) and m.v.shape == (rank, 22)
    assert rel_err(m.to_dense(), w) < EXACT


@pytest.mark.parametrize(
    ("shape", "a_shape", "terms"),
    [
        ((12, 20), (3, 4), 1),
        ((12, 20), (3, 4), 3),
        ((12, 20), (6, 10), 2),
        ((12, 20), (1, 20), 1),  # A is a 1xN row, B is a column
        ((12, 20), (12, 1), 1),  # A is an Mx1 column, B is a row
        ((12, 20), (1, 4), 2),
        ((12, 20), (4, 1), 2),
        ((12, 20), (1, 1), 1),  # A is a scalar: W = a*B
        ((12, 20), (12, 20), 1),  # B is a scalar
        ((16, 16), (4, 4), 16),  # full rank of the rearrangement
    ],
)
def test_kronecker_exact_on_sum_of_products(shape, a_shape, terms) -> None:
    m1, n1 = a_shape
    m2, n2 = shape[0] // m1, shape[1] // n1
    a, b = randn(terms, m1, n1, seed=3), randn(terms, m2, n2, seed=4)
    w = sum(torch.kron(a[r], b[r]) for r in range(terms))
    m = Kronecker.fit(w, KroneckerSpec(a_shape=a_shape, terms=terms))
    assert m.a.shape == (terms, m1, n1) and m.b.shape == (terms, m2, n2)
    assert m.to_dense().shape == shape
    assert rel_err(m.to_dense(), w) < EXACT


def _orthogonal_sparse(shape, row_support, col_support, nnz, seed):
    """Sparse S with ``nnz`` entries of magnitude in [2, 3] inside ``row_support x col_support``."""
    g = gen(seed)
    cells = torch.cartesian_prod(torch.as_tensor(row_support), torch.as_tensor(col_support))
    pick = cells[torch.randperm(cells.shape[0], generator=g)[:nnz]]
    s = torch.zeros(shape, dtype=F64)
    sign = torch.where(torch.rand(nnz, generator=g) < 0.5, -1.0, 1.0).double()
    s[pick[:, 0], pick[:, 1]] = sign * (2 + torch.rand(nnz, generator=g, dtype=F64))
    return s


def test_doped_kronecker_exact_on_kron_plus_sparse() -> None:
    # The doped fit is greedy (base first, overlay on the residual), so for it to recover A⊗B + S
    # exactly the base fit must not absorb any of S: S is placed where A⊗B is zero, at A-cells and
    # B-cells that are zero, which makes rearrange(S) orthogonal to vec(A) vec(B)^T on both sides.
    # |S| entries (2..3) dominate the residual (~1e-15) and σ1(A⊗B) = |A||B| ≫ ||S||_2.
    a_shape, shape = (4, 6), (16, 24)
    a, b = randn(4, 6, seed=5) + 3, randn(4, 4, seed=6) + 3
    a[0, :] = 0  # A-cells (0, *) are zero
    b[:, 0] = 0  # B-cells (*, 0) are zero
    kron = torch.kron(a, b)
    rows = [0, 1, 2, 3]  # i1 = 0 -> rows i1*4 + i2
    cols = [j1 * 4 for j1 in range(6)]  # j2 = 0 -> cols j1*4 + 0
    s = _orthogonal_sparse(shape, rows, cols, nnz=9, seed=7)
    assert kron[s != 0].abs().max() == 0
    w = kron + s
    spec = DopedSpec(base=KroneckerSpec(a_shape=a_shape, terms=1), density=9 / w.numel())
    m = Doped.fit(w, spec)
    assert spec.nnz(shape) == 9 and m.overlay.index.nnz == 9
    assert rel_err(m.to_dense(), w) < EXACT
    assert rel_err(m.base.to_dense(), kron) < EXACT
    assert torch.equal(m.overlay.to_dense() != 0, s != 0)
    assert rel_err(m.overlay.to_dense(), s) < EXACT


def test_doped_lowrank_exact_on_lowrank_plus_sparse() -> None:
    # Same idea: U has zero rows 20.., V zero columns 15.., S lives in that corner, so the rank-r SVD
    # of W is exactly U V (σ_r(UV) > ||S||_2, checked) and the residual is exactly S.
    shape, r = (24, 18), 3
    u, v = randn(24, r, seed=8) * 3, randn(r, 18, seed=9) * 3
    u[20:] = 0
    v[:, 15:] = 0
    low = u @ v
    s = _orthogonal_sparse(shape, range(20, 24), range(15, 18), nnz=6, seed=10)
    assert torch.linalg.svdvals(low)[r - 1] > torch.linalg.matrix_norm(s, ord=2)
    w = low + s
    m = Doped.fit(w, DopedSpec(base=LowRankSpec(rank=r), density=6 / w.numel()))
    assert rel_err(m.to_dense(), w) < EXACT
    assert rel_err(m.base.to_dense(), low) < EXACT
    assert rel_err(m.overlay.to_dense(), s) < EXACT


def test_doped_without_base_exact_on_sparse() -> None:
    s = _orthogonal_sparse((10, 14), range(10), range(14), nnz=17, seed=11)
    m = Doped.fit(s, DopedSpec(density=17 / 140))
    assert m.base is None
    assert rel_err(m.to_dense(), s) < EXACT


def test_doped_fit_is_base_fit_plus_top_residual() -> None:
    # On a generic matrix: base = the base format's own fit, overlay = top-|.| entries of the residual.
    w = randn(12, 20, seed=12)
    spec = DopedSpec(base=KroneckerSpec(a_shape=(3, 4), terms=2), density=0.1)
    m = Doped.fit(w, spec)
    base = Kronecker.fit(w, spec.base).to_dense()
    res = w - base
    mask = top_magnitude_mask(res, 24)
    assert rel_err(m.base.to_dense(), base) < EXACT
    assert torch.equal(m.overlay.index.mask(), mask)
    # every kept entry is at least as large as every dropped one
    assert res[mask].abs().min() >= res[~mask].abs().max()
    assert rel_err(m.to_dense(), base + torch.where(mask, res, 0.0)) < EXACT


@pytest.mark.parametrize(("block", "kept"), [((4, 5), 5), ((1, 1), 37), ((12, 20), 1), ((2, 4), 30)])
def test_blocksparse_exact_on_block_sparse(block, kept) -> None:
    shape = (12, 20)
    bh, bw = block
    gr, gc = shape[0] // bh, shape[1] // bw
    keep = torch.randperm(gr * gc, generator=gen(13))[:kept]
    mask = torch.zeros(gr * gc, dtype=torch.bool)
    mask[keep] = True
    mask = mask.reshape(gr, gc)
    w = randn(*shape, seed=14) * mask.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    m = BlockSparse.fit(w, BlockSparseSpec(block=block, density=kept / (gr * gc)))
    assert m.blocks.shape == (kept, bh, bw)
    assert torch.equal(m.index.mask(), mask)
    assert rel_err(m.to_dense(), w) < EXACT


def test_dense_is_exact_and_a_copy() -> None:
    w = randn(5, 7)
    m = Dense.fit(w, DenseSpec())
    assert torch.equal(m.to_dense(), w)
    w.zero_()
    assert m.to_dense().abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Error is non-increasing in the budget; optimality


def _errors(w, specs):
    return [rel_err(F.fit(w, s).to_dense(), w) for s in specs]


def _assert_non_increasing(errs, tol=1e-12):
    assert all(b <= a + tol for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < errs[0]  # and the budget actually buys something


def test_lowrank_error_monotone_in_rank() -> None:
    w = randn(16, 24, seed=20)
    errs = _errors(w, [LowRankSpec(rank=r) for r in range(1, 17)])
    _assert_non_increasing(errs)
    assert errs[-1] < EXACT  # full rank is exact


def test_kronecker_error_monotone_in_terms() -> None:
    w = randn(16, 24, seed=21)
    errs = _errors(w, [KroneckerSpec(a_shape=(4, 4), terms=t) for t in range(1, 17)])
    _assert_non_increasing(errs)
    assert errs[-1] < EXACT  # min(16, 24) terms span the rearrangement


@pytest.mark.parametrize("base", [None, KroneckerSpec(a_shape=(4, 6), terms=1), LowRankSpec(rank=2)])
def test_doped_error_monotone_in_density(base) -> None:
    w = randn(16, 24, seed=22)
    densities = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0] if base else [0.01, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0]
    errs = _errors(w, [DopedSpec(base=base, density=d) for d in densities])
    _assert_non_increasing(errs)
    assert errs[-1] < EXACT  # density 1 keeps the whole residual


def test_blocksparse_error_monotone_in_density() -> None:
    w = randn(16, 24, seed=23)
    errs = _errors(w, [BlockSparseSpec(block=(4, 4), density=k / 24) for k in range(1, 25)])
    _assert_non_increasing(errs)
    assert errs[-1] < EXACT


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_lowrank_error_is_svd_tail(rank: int) -> None:
    w = randn(14, 22, seed=24)
    s = torch.linalg.svdvals(w)
    tail = float(s[rank:].pow(2).sum().sqrt())
    err = fro(w - LowRank.fit(w, LowRankSpec(rank=rank)).to_dense())
    assert err == pytest.approx(tail, rel=1e-10)


@pytest.mark.parametrize(("a_shape", "terms"), [((2, 3), 1), ((2, 3), 4), ((7, 4), 3), ((1, 12), 1), ((14, 1), 1)])
def test_kronecker_error_is_rearrangement_tail(a_shape, terms) -> None:
    w = randn(14, 12, seed=25)
    s = torch.linalg.svdvals(rearrange(w, a_shape))
    tail = float(s[terms:].pow(2).sum().sqrt())
    err = fro(w - Kronecker.fit(w, KroneckerSpec(a_shape=a_shape, terms=terms)).to_dense())
    assert err == pytest.approx(tail, rel=1e-10, abs=1e-12)


def test_rearrange_maps_kron_to_rank_one() -> None:
    a, b = randn(3, 5, seed=26), randn(4, 2, seed=27)
    r = rearrange(torch.kron(a, b), (3, 5))
    assert r.shape == (15, 8)
    assert torch.allclose(r, torch.outer(a.flatten(), b.flatten()), atol=1e-14)


def test_blocksparse_error_is_dropped_block_norms() -> None:
    w = randn(12, 20, seed=28)
    norms = to_blocks(w, (3, 5)).pow(2).sum((2, 3)).flatten().sort().values  # ascending
    for k in (1, 5, 11, 16):
        m = BlockSparse.fit(w, BlockSparseSpec(block=(3, 5), density=k / 16))
        dropped = float(norms[: 16 - k].sum().sqrt())
        assert fro(w - m.to_dense()) == pytest.approx(dropped, rel=1e-10, abs=1e-12)


def test_unstructured_doped_error_is_dropped_entries() -> None:
    w = randn(10, 12, seed=29)
    for k in (1, 30, 119):
        m = Doped.fit(w, DopedSpec(density=k / 120))
        mask = row_balanced_mask(w, k)
        assert torch.equal(m.overlay.index.mask(), mask)
        assert fro(w - m.to_dense()) == pytest.approx(float(w[~mask].pow(2).sum().sqrt()), rel=1e-10)


def test_row_balanced_pruning_keeps_rows_equally_full_and_nested() -> None:
    w = randn(10, 12, seed=30)
    previous = torch.zeros(10, 12, dtype=torch.bool)
    for k in range(121):
        mask = row_balanced_mask(w, k)
        counts = mask.sum(1)
        assert int(counts.sum()) == k and int(counts.max() - counts.min()) <= 1
        assert bool((previous <= mask).all())  # a larger count keeps a superset
        for r in range(10):  # each row keeps its largest entries
            if 0 < counts[r] < 12:
                assert w[r][mask[r]].abs().min() >= w[r][~mask[r]].abs().max()
        previous = mask
    # the extra entries (k not a multiple of the rows) go to the rows whose next entry is largest
    nxt = w.abs().sort(1, descending=True).values[:, 3]
    assert set(torch.nonzero(row_balanced_mask(w, 33).sum(1) == 4).flatten().tolist()) == set(
        torch.argsort(nxt, descending=True)[:3].tolist())
    # the positions come in an order whose prefixes are the masks
    order = row_balanced_order(w, 120)
    for k in (0, 7, 33, 120):
        prefix = torch.zeros(120, dtype=torch.bool)
        prefix[order[:k]] = True
        assert torch.equal(prefix.reshape(10, 12), row_balanced_mask(w, k))


def test_row_balanced_pruning_gives_short_rows_share_to_the_others() -> None:
    w = torch.zeros(4, 6)
    w[0, :5] = torch.arange(1.0, 6.0)  # row 0: 5 non-zeros; rows 1-3: one each
    w[1, 2], w[2, 0], w[3, 5] = 0.5, -7.0, 0.1
    mask = row_balanced_mask(w, 8)
    assert torch.equal(mask, w != 0)


# --------------------------------------------------------------------------------------------------
# Byte, parameter and FLOP counts


def test_hand_computed_nbytes() -> None:
    s = (48, 64)
    assert DenseSpec().nbytes(s, 2) == 48 * 64 * 2 == 6144
    assert LowRankSpec(rank=5).nbytes(s, 4) == 5 * (48 + 64) * 4 == 2240
    # a_shape (6, 8) -> B is 8x8
    assert KroneckerSpec(a_shape=(6, 8), terms=2).nbytes(s, 4) == 2 * (6 * 8 + 8 * 8) * 4 == 896
    # doped, lowrank r=2 base, 30 kept entries: CSR index = int32 rowptr (49) + int16 cols (30)
    d = DopedSpec(base=LowRankSpec(rank=2), density=30 / 3072)
    assert d.nnz(s) == 30
    assert d.nbytes(s, 4) == 2 * 112 * 4 + 30 * 4 + (4 * 49 + 2 * 30) == 896 + 120 + 256 == 1272
    # doped without base, 200 kept: CSR would be 196 + 400 = 596 > bitmap ceil(3072 / 8) = 384
    d = DopedSpec(density=200 / 3072)
    assert d.nbytes(s, 2) == 200 * 2 + 384 == 784
    # blocks (8, 8): 6x8 grid, 12 blocks kept, bitmap ceil(48/8) = 6 < CSR 4*7 + 2*12 = 52
    assert BlockSparseSpec(block=(8, 8), density=0.25).nbytes(s, 4) == 12 * 64 * 4 + 6 == 3078
    # blocks (4, 2) on 16x1024: 4x512 grid, 10 blocks, CSR 4*5 + 2*10 = 40 < bitmap 256
    assert BlockSparseSpec(block=(4, 2), density=10 / 2048).nbytes((16, 1024), 4) == 10 * 8 * 4 + 40 == 360
    # a bitmap over a cell count that is not a multiple of 8 rounds up: 3x5 = 15 bits -> 2 bytes
    assert F.index_bytes((3, 5), 10) == ("bitmap", 2)


def test_hand_computed_module_nbytes() -> None:
    w = randn(48, 64, seed=30, dtype=torch.float32)
    assert LowRank.fit(w, LowRankSpec(rank=5)).nbytes() == 2240
    assert Kronecker.fit(w, KroneckerSpec(a_shape=(6, 8), terms=2)).nbytes() == 896
    m = Doped.fit(w, DopedSpec(base=LowRankSpec(rank=2), density=30 / 3072))
    assert m.overlay.index.encoding == "csr"
    assert m.overlay.index.crow.dtype == torch.int32 and m.overlay.index.crow.numel() == 49
    assert m.overlay.index.col.dtype == torch.int16 and m.overlay.index.col.numel() == 30
    assert m.nbytes() == 1272
    m = Doped.fit(w.half(), DopedSpec(density=200 / 3072))
    assert m.overlay.index.encoding == "bitmap" and m.overlay.index.bitmap.numel() == 384
    assert m.nbytes() == 784
    assert BlockSparse.fit(w, BlockSparseSpec(block=(8, 8), density=0.25)).nbytes() == 3078
    w2 = randn(16, 1024, seed=31, dtype=torch.float32)
    assert BlockSparse.fit(w2, BlockSparseSpec(block=(4, 2), density=10 / 2048)).nbytes() == 360


def test_hand_computed_nparams_and_flops() -> None:
    s = (48, 64)
    assert DenseSpec().flops_per_token(s) == 2 * 48 * 64
    assert LowRankSpec(rank=5).nparams(s) == 560
    assert LowRankSpec(rank=5).flops_per_token(s) == 2 * 5 * 112
    k = KroneckerSpec(a_shape=(6, 8), terms=2)  # m1,n1 = 6,8; m2,n2 = 8,8
    assert k.nparams(s) == 2 * (48 + 64)
    # B first: m2*n1*(n2+m1) = 8*8*14 = 896; A first: m1*n2*(n1+m2) = 6*8*16 = 768
    assert k.flops_per_token(s) == 2 * 2 * 768
    d = DopedSpec(base=k, density=30 / 3072)
    assert d.nparams(s) == 224 + 30 and d.flops_per_token(s) == 2 * 2 * 768 + 60
    b = BlockSparseSpec(block=(8, 8), density=0.25)
    assert b.nparams(s) == 768 and b.flops_per_token(s) == 1536
    # at least one block is kept however low the density
    assert BlockSparseSpec(block=(8, 8), density=1e-9).nblocks(s) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("name", "spec", "shape"), CASES, ids=CASE_IDS)
def test_module_nbytes_matches_spec(name, spec, shape, dtype) -> None:
    m = fitted(spec, shape, dtype=dtype)
    assert m.dtype == dtype
    assert m.shape == shape
    assert m.nbytes() == spec.nbytes(shape, torch.tensor([], dtype=dtype).element_size())
    assert m.nparams() == spec.nparams(shape)
    assert m.flops_per_token() == spec.flops_per_token(shape)


def test_doped_encoding_switches_csr_to_bitmap() -> None:
    # 48x64: bitmap 384 bytes; CSR 196 + 2*nnz -> CSR below 94 kept entries, bitmap from 94 (tie).
    shape = (48, 64)
    w = randn(*shape, seed=32, dtype=torch.float32)
    seen = []
    for nnz in (1, 50, 93, 94, 95, 500, 3072):
        spec = DopedSpec(density=nnz / 3072)
        m = Doped.fit(w, spec)
        enc, size = F.index_bytes(shape, nnz)
        assert m.overlay.index.encoding == enc
        assert size == min(384, 196 + 2 * nnz)
        assert m.nbytes() == nnz * 4 + size == spec.nbytes(shape, 4)
        seen.append(enc)
    assert seen == ["csr"] * 3 + ["bitmap"] * 4


def test_csr_columns_widen_to_int32_for_wide_grids() -> None:
    assert F.index_bytes((2, 32767), 3) == ("csr", 4 * 3 + 3 * 2)
    assert F.index_bytes((2, 32768), 3) == ("csr", 4 * 3 + 3 * 4)
    w = torch.zeros(2, 40000, dtype=torch.float32)
    w[0, 39999], w[1, 5], w[1, 33000] = 1.0, 2.0, 3.0
    m = Doped.fit(w, DopedSpec(density=3 / 80000))
    assert m.overlay.index.col.dtype == torch.int32
    assert m.nbytes() == 3 * 4 + 12 + 12
    assert torch.equal(m.to_dense(), w)


# --------------------------------------------------------------------------------------------------
# forward / rows / to_dense agree


@pytest.mark.parametrize(("name", "spec", "shape"), CASES, ids=CASE_IDS)
def test_forward_and_rows_match_dense_f64(name, spec, shape) -> None:
    m = fitted(spec, shape)
    dense = m.to_dense().detach()
    assert dense.shape == shape and dense.dtype == F64
    x = randn(2, 3, shape[1], seed=40)
    y = m(x)
    assert y.shape == (2, 3, shape[0])
    assert torch.allclose(y, x @ dense.T, rtol=1e-10, atol=1e-12)
    x1 = randn(shape[1], seed=41)  # no batch dims
    assert torch.allclose(m(x1), dense @ x1, rtol=1e-10, atol=1e-12)
    idx = torch.tensor([[0, shape[0] - 1, 3, 3], [1, 0, shape[0] - 1, 0], [2, 2, 2, 5]])
    r = m.rows(idx)
    assert r.shape == (3, 4, shape[1])
    assert torch.allclose(r, dense[idx], rtol=1e-10, atol=1e-12)
    every = torch.arange(shape[0])
    assert torch.allclose(m.rows(every), dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("name", "spec", "shape"), CASES, ids=CASE_IDS)
def test_forward_and_rows_match_dense_low_precision(name, spec, shape, dtype) -> None:
    m = fitted(spec, shape, dtype=dtype)
    dense = m.to_dense().detach()
    assert dense.dtype == dtype
    x = randn(2, 3, shape[1], seed=42, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype and y.shape == (2, 3, shape[0])
    ref = x.double() @ dense.double().T
    assert rel_err(y, ref) < LOW_TOL[dtype]
    idx = torch.tensor([[0, shape[0] - 1, 3, 3], [1, 0, shape[0] - 1, 0]])
    r = m.rows(idx)
    assert r.dtype == dtype and r.shape == (2, 4, shape[1])
    assert rel_err(r, dense[idx]) < LOW_TOL[dtype]


def test_low_precision_fit_is_close_to_f64_fit() -> None:
    w = randn(12, 20, seed=43)
    for spec in (LowRankSpec(rank=3), KroneckerSpec(a_shape=(3, 4), terms=2)):
        ref = F.fit(w, spec).to_dense()
        for dtype in (torch.float16, torch.bfloat16):
            assert rel_err(F.fit(w.to(dtype), spec).to_dense(), ref) < LOW_TOL[dtype]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def test_kronecker_apply_every_factor_shape() -> None:
    # Every a_shape on a 12x20 weight, so both contraction orders of kronecker_apply are exercised.
    branches = set()
    x = randn(5, 20, seed=44)
    idx = torch.tensor([[11, 0], [5, 5]])
    for m1 in _divisors(12):
        for n1 in _divisors(20):
            m2, n2 = 12 // m1, 20 // n1
            terms = min(2, m1 * n1, m2 * n2)
            a, b = randn(terms, m1, n1, seed=m1), randn(terms, m2, n2, seed=n1)
            spec = KroneckerSpec(a_shape=(m1, n1), terms=terms)
            m = Kronecker(a, b, spec)
            ref = sum(torch.kron(a[r], b[r]) for r in range(terms))
            assert torch.allclose(m.to_dense(), ref, atol=1e-12)
            assert torch.allclose(kronecker_apply(x, a, b), x @ ref.T, rtol=1e-10, atol=1e-12)
            assert torch.allclose(m.rows(idx), ref[idx], atol=1e-12)
            branches.add(m2 * n1 * (n2 + m1) <= m1 * n2 * (n1 + m2))
    assert branches == {True, False}


# --------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize(("name", "spec", "shape"), CASES, ids=CASE_IDS)
def test_gradients_reach_every_factor(name, spec, shape) -> None:
    m = fitted(spec, shape)
    params = dict(m.named_parameters())
    assert params, "a format with nothing to train"
    x = randn(2, 3, shape[1], seed=50)
    idx = torch.tensor([[0, 1], [shape[0] - 1, 1]])
    cot_y, cot_r = randn(2, 3, shape[0], seed=51), randn(2, 2, shape[1], seed=52)
    loss = (m(x) * cot_y).sum() + (m.rows(idx) * cot_r).sum()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    for (pname, p), g in zip(params.items(), grads, strict=True):
        assert g is not None, f"no gradient reaches {pname}"
        assert g.shape == p.shape and torch.isfinite(g).all(), pname
        if p.numel():
            assert g.abs().sum() > 0, f"zero gradient at {pname}"
    # and they are the gradients of the same loss computed through the dense matrix
    dense = m.to_dense()
    loss_ref = ((x @ dense.T) * cot_y).sum() + (dense[idx] * cot_r).sum()
    ref = torch.autograd.grad(loss_ref, list(params.values()), allow_unused=True)
    for pname, g, gr in zip(params, grads, ref, strict=True):
        assert torch.allclose(g, gr, rtol=1e-10, atol=1e-12), pname


def test_backward_of_sum_populates_grad() -> None:
    for _, spec, shape in CASES:
        m = fitted(spec, shape)
        m(randn(2, 3, shape[1], seed=53)).sum().backward()
        for pname, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (spec, pname)


# --------------------------------------------------------------------------------------------------
# Bad parameters


@pytest.mark.parametrize(
    ("spec", "shape", "needles"),
    [
        (LowRankSpec(rank=13), (12, 20), ["rank=13", "12x20"]),
        (LowRankSpec(rank=21), (30, 20), ["rank=21", "30x20"]),
        (KroneckerSpec(a_shape=(5, 4)), (12, 20), ["a_shape=(5, 4)", "12x20"]),
        (KroneckerSpec(a_shape=(3, 3)), (12, 20), ["a_shape=(3, 3)", "12x20"]),
        (KroneckerSpec(a_shape=(0, 4)), (12, 20), ["a_shape=(0, 4)", "12x20"]),
        (KroneckerSpec(a_shape=(3, 4), terms=13), (12, 20), ["terms=13", "12x20", "12"]),
        (KroneckerSpec(a_shape=(12, 20), terms=2), (12, 20), ["terms=2", "12x20"]),
        (BlockSparseSpec(block=(5, 4), density=0.5), (12, 20), ["block=(5, 4)", "12x20"]),
        (BlockSparseSpec(block=(4, 0), density=0.5), (12, 20), ["block=(4, 0)", "12x20"]),
        (DopedSpec(density=0.0), (12, 20), ["density", "12x20"]),
        (DopedSpec(base=LowRankSpec(rank=13), density=0.1), (12, 20), ["rank=13", "12x20"]),
        (DopedSpec(base=KroneckerSpec(a_shape=(5, 4)), density=0.1), (12, 20), ["a_shape=(5, 4)", "12x20"]),
    ],
)
def test_bad_parameters_raise_format_error(spec, shape, needles) -> None:
    with pytest.raises(FormatError) as e:
        spec.check(shape)
    for needle in needles:
        assert needle in str(e.value)
    with pytest.raises(FormatError) as e:
        F.fit(randn(*shape), spec)
    for needle in needles:
        assert needle in str(e.value)


def test_good_parameters_pass_check() -> None:
    for _, spec, shape in CASES:
        spec.check(shape)  # must not raise
    KroneckerSpec(a_shape=(3, 4), terms=12).check((12, 20))  # exactly the bound
    LowRankSpec(rank=12).check((12, 20))
    DopedSpec(base=LowRankSpec(rank=1), density=0.0).check((12, 20))


def test_bad_weights_raise_format_error() -> None:
    with pytest.raises(FormatError, match="2-D"):
        F.fit(torch.zeros(3, 4, 5), LowRankSpec(rank=1))
    with pytest.raises(FormatError, match="floating point"):
        F.fit(torch.zeros(3, 4, dtype=torch.int64), KroneckerSpec(a_shape=(1, 1)))
    with pytest.raises(FormatError):
        LowRank(torch.zeros(4, 2), torch.zeros(3, 5), LowRankSpec(rank=2))
    with pytest.raises(FormatError):
        Kronecker(torch.zeros(2, 2, 2), torch.zeros(1, 2, 2), KroneckerSpec(a_shape=(2, 2), terms=2))


def test_unknown_kind_raises_format_error() -> None:
    class Odd(DenseSpec):
        kind: str = "odd"

    with pytest.raises(FormatError, match="odd"):
        F.fit(randn(2, 2), Odd())


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (LowRankSpec, {"rank": 0}),
        (LowRankSpec, {"rank": -3}),
        (LowRankSpec, {"rank": 3, "extra": 1}),
        (LowRankSpec, {}),
        (KroneckerSpec, {"a_shape": (2, 2), "terms": 0}),
        (KroneckerSpec, {"a_shape": (2, 2, 2)}),
        (KroneckerSpec, {"a_shape": (2, 2), "rank": 1}),
        (DopedSpec, {"density": 1.5}),
        (DopedSpec, {"density": -0.1}),
        (DopedSpec, {"density": 0.1, "base": {"kind": "dense"}}),
        (DopedSpec, {"density": 0.1, "base": {"kind": "lowrank", "rank": 2, "bogus": 1}}),
        (BlockSparseSpec, {"block": (2, 2), "density": 0.0}),
        (BlockSparseSpec, {"block": (2, 2), "density": 1.5}),
        (DenseSpec, {"rank": 2}),
    ],
)
def test_pydantic_rejects_bad_values_and_unknown_keys(cls, kwargs) -> None:
    with pytest.raises(ValidationError):
        cls(**kwargs)


def test_specs_are_frozen() -> None:
    spec = LowRankSpec(rank=2)
    with pytest.raises(ValidationError):
        spec.rank = 3  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# Spec serialisation


ALL_SPECS = [c[1] for c in CASES] + [
    DopedSpec(base=KroneckerSpec(a_shape=(1, 7), terms=1), density=1.0),
    DopedSpec(base=None, density=0.333),
]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=[s.describe() for s in ALL_SPECS])
def test_parse_spec_round_trips(spec) -> None:
    back = parse_spec(spec.model_dump())
    assert type(back) is type(spec) and back == spec
    text = spec.model_dump_json()
    back = parse_spec(json.loads(text))
    assert type(back) is type(spec) and back == spec
    if isinstance(spec, DopedSpec):
        assert type(back.base) is type(spec.base)
    assert back.model_dump_json() == text
    assert hash(back) == hash(spec)


def test_parse_spec_rejects_unknown_kind_and_keys() -> None:
    with pytest.raises(ValidationError):
        parse_spec({"kind": "tucker", "rank": 2})
    with pytest.raises(ValidationError):
        parse_spec({"kind": "lowrank", "rank": 2, "extra": 1})
    assert parse_spec({"kind": "kronecker", "a_shape": [2, 3]}) == KroneckerSpec(a_shape=(2, 3), terms=1)


# --------------------------------------------------------------------------------------------------
# Device/dtype moves keep the sparse index working


@pytest.mark.parametrize("density", [0.02, 0.5])  # csr, bitmap
def test_doped_to_float64_keeps_decode(density: float) -> None:
    m = fitted(DopedSpec(base=LowRankSpec(rank=2), density=density), SHAPE, dtype=torch.float32)
    before = m.overlay.index.decode()
    x = randn(4, SHAPE[1], seed=60, dtype=torch.float32)
    y32 = m(x).detach()
    m = m.to(torch.float64)
    assert m.dtype == F64 and m.overlay.values.dtype == F64
    for buf in m.overlay.index.buffers():
        assert not buf.is_floating_point()
    after = m.overlay.index.decode()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    y64 = m(x.double())
    assert y64.dtype == F64
    assert torch.allclose(y64, x.double() @ m.to_dense().T, rtol=1e-10, atol=1e-12)
    assert rel_err(y32, y64) < 1e-5
    assert m.nbytes() == m.spec.nbytes(SHAPE, 8)


def test_blocksparse_half_round_trip_keeps_decode() -> None:
    m = fitted(BlockSparseSpec(block=(4, 5), density=0.5), SHAPE)
    ref = m.to_dense().detach().clone()
    m.half()
    assert m.index.decode()[0].dtype == torch.int64
    m.double()
    assert rel_err(m.to_dense(), ref) < 1e-3
    assert m.nbytes() == m.spec.nbytes(SHAPE, 8)


def test_fit_does_not_alias_or_modify_the_weight() -> None:
    for _, spec, shape in CASES:
        w = randn(*shape, seed=61)
        keep = w.clone()
        m = F.fit(w, spec)
        assert torch.equal(w, keep)
        for p in m.parameters():
            assert p.data_ptr() != w.data_ptr()


def test_math_sanity_of_budget_helpers() -> None:
    # density -> kept count rounds to nearest (ties to even) and clamps to the cell count
    spec = DopedSpec(density=0.5)
    assert spec.nnz((3, 3)) == 4  # 4.5 -> 4
    assert DopedSpec(density=1.0).nnz((7, 9)) == 63
    assert DopedSpec(density=1.0).nbytes((7, 9), 4) == 63 * 4 + math.ceil(63 / 8)


def test_spec_capabilities_replace_switches_on_spec_classes() -> None:
    """Recovery schemes and policy matching ask these instead of testing spec or choice classes."""
    from kronc.planning.families.dense import DenseChoice
    from kronc.policies import LowRankChoice
    from kronc.values import Precision

    doped = F.DopedSpec(base=F.LowRankSpec(rank=4), density=0.05)
    assert doped.overlay_density == 0.05 and doped.factor_rank is None
    denser = doped.with_overlay_density(0.2)
    assert isinstance(denser, F.DopedSpec) and denser.overlay_density == 0.2 and denser.base == doped.base
    int8 = F.DopedSpec(base=F.LowRankSpec(rank=4), density=0.05, precision=Precision(dtype="int8"))
    assert int8.with_overlay_density(0.01).precision == Precision(dtype="int8")  # annealing keeps the bits
    assert F.LowRankSpec(rank=3).factor_rank == 3 and F.LowRankSpec(rank=3).overlay_density is None
    for spec in (F.DenseSpec(), F.KroneckerSpec(a_shape=(2, 2)), F.BlockSparseSpec(block=(2, 2), density=0.5)):
        assert spec.overlay_density is None and spec.factor_rank is None
        with pytest.raises(F.FormatError, match=f"a {spec.kind} spec has no sparse overlay"):
            spec.with_overlay_density(0.1)
    assert DenseChoice().identity
    assert not DenseChoice(precisions=[Precision(dtype="int8")]).identity  # a lower precision compresses
    assert not LowRankChoice().identity
