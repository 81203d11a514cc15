"""Every kronc Triton kernel under the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors.

Each kernel is compared with float64 math on the same (rounded) inputs, across shapes that divide
the interpreter's tiles (16) and shapes that do not, float32/float16/bfloat16 and 1 to 3 terms.
Tolerance: ``max|y - ref| <= tol * max|ref|`` with tol 1e-5 (float32), 3e-3 (float16) and 3e-2
(bfloat16); the kernels accumulate in float32 and round the on-chip intermediate to the input dtype
as the torch path does. Skipped when triton is not installed.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

pytest.importorskip("triton")

from kronc.codegen import backend  # noqa: E402
from kronc.codegen.ops import OpInputError  # noqa: E402
from kronc.codegen.triton import _common, blocksparse, doped_kron, kron, kron_embedding, lowrank, sparse  # noqa: E402
from kronc.formats import BlockSparseSpec, DopedSpec, KroneckerSpec, LowRankSpec, fit  # noqa: E402

# tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA before triton is imported;
# with the interpreter the kernels run on CPU tensors, without it on CUDA tensors
if _common.is_interpreted(kron._kron_kernel):
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("no CUDA and triton was imported without TRITON_INTERPRET=1", allow_module_level=True)

ops = torch.ops.kronc


@pytest.fixture(autouse=True)
def _on_device():  # tensors made in the tests (torch.tensor, torch.zeros, ...) land on DEVICE
    with torch.device(DEVICE):
        yield
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def close(y: Tensor, ref: Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == ref.shape
    scale = ref.abs().max().item() if ref.numel() else 1.0
    err = (y.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= TOL[dtype] * max(scale, 1e-3), f"max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def rand(*shape: int, dtype: torch.dtype, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), device="cpu").to(DEVICE, dtype)


def entries(out: int, inn: int, nnz: int, dtype: torch.dtype, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(out * inn, generator=g, device="cpu")[:nnz].sort().values.to(DEVICE)
    return flat // inn, flat % inn, torch.randn(nnz, generator=g, device="cpu").to(DEVICE, dtype)


def d(t: Tensor) -> Tensor:
    return t.double()


def dense_kron(a: Tensor, b: Tensor) -> Tensor:
    return sum(torch.kron(d(a[r]), d(b[r])) for r in range(a.shape[0]))  # type: ignore[return-value]


def dense_sparse(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.zeros(shape, dtype=torch.float64).index_put((rows, cols), d(values))


# (R, m1, n1, m2, n2, tokens): 32x32 with tokens dividing the 16-wide tiles; 24x40 (the ragged one);
# 15x34 whose q1 extent (17) takes the batched-dot path
KRON_CASES = [(1, 2, 2, 16, 16, 16), (2, 4, 5, 6, 8, 5), (3, 3, 17, 5, 2, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KRON_CASES)
def test_kron_kernel(case: tuple[int, ...], dtype: torch.dtype) -> None:
    R, m1, n1, m2, n2, T = case
    a, b = rand(R, m1, n1, dtype=dtype, seed=0), rand(R, m2, n2, dtype=dtype, seed=1)
    x, bias = rand(T, n1 * n2, dtype=dtype, seed=2), rand(m1 * m2, dtype=dtype, seed=3)
    w = dense_kron(a, b)
    close(kron.kron_linear(x, a, b, bias), d(x) @ w.T + d(bias), dtype)


@pytest.mark.parametrize("terms", [1, 2, 3])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("b_first", [False, True])
def test_kron_kernel_paths_and_terms(terms: int, chunked: bool, b_first: bool) -> None:
    """Both contraction orders and both q1 paths, on a ragged shape with leading batch dims."""
    a, b = rand(terms, 4, 5, dtype=torch.float32, seed=4), rand(terms, 6, 8, dtype=torch.float32, seed=5)
    x = rand(2, 3, 40, dtype=torch.float32, seed=6)
    y = kron.kron_linear(x, a, b, chunked=chunked, b_first=b_first)
    close(y, d(x) @ dense_kron(a, b).T, torch.float32)


def test_kron_kernel_strided_factors_and_empty_inputs() -> None:
    a, b = rand(2, 5, 4, dtype=torch.float32, seed=7), rand(2, 8, 6, dtype=torch.float32, seed=8)
    at, bt = a.transpose(1, 2), b.transpose(1, 2)  # views, as the x-gradient passes them
    x = rand(4, 40, dtype=torch.float32, seed=9)
    close(kron.kron_linear(x, at, bt), d(x) @ dense_kron(at, bt).T, torch.float32)
    assert kron.kron_linear(x[:0], at, bt).shape == (0, 24)
    xs = rand(40, 6, dtype=torch.float32, seed=10).T  # non-contiguous input: copied, not misread
    close(kron.kron_linear(xs, at, bt), d(xs) @ dense_kron(at, bt).T, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("terms", [1, 3])
def test_doped_kron_kernel(dtype: torch.dtype, terms: int) -> None:
    a, b = rand(terms, 4, 5, dtype=dtype, seed=11), rand(terms, 6, 8, dtype=dtype, seed=12)
    rows, cols, values = entries(24, 40, 40, dtype)
    rows[-6:], cols[-6:] = 23, torch.arange(6) * 6  # one long row among short ones
    x, bias = rand(5, 40, dtype=dtype, seed=13), rand(24, dtype=dtype, seed=14)
    w = dense_kron(a, b) + dense_sparse(rows, cols, values, (24, 40))
    close(doped_kron.doped_kron_linear(x, a, b, rows, cols, values, bias), d(x) @ w.T + d(bias), dtype)
    close(doped_kron.doped_kron_linear(x, a, b, rows, cols, values, chunked=True), d(x) @ w.T, dtype)
    empty = torch.zeros(0, dtype=torch.int64)
    close(doped_kron.doped_kron_linear(x, a, b, empty, empty, values[:0]), d(x) @ dense_kron(a, b).T, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(24, 40, 5), (32, 16, 16)])
def test_sparse_kernel(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    out, inn, T = shape
    rows, cols, values = entries(out, inn, out * inn // 6, dtype, seed=15)
    x, bias = rand(T, inn, dtype=dtype, seed=16), rand(out, dtype=dtype, seed=17)
    w = dense_sparse(rows, cols, values, (out, inn))
    close(sparse.sparse_linear(x, rows, cols, values, out, bias), d(x) @ w.T + d(bias), dtype)
    close(sparse.sparse_linear(x, rows.int(), cols.int(), values, out), d(x) @ w.T, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(24, 40, 5, 3), (32, 32, 16, 16), (40, 24, 17, 1)])
def test_lowrank_kernel(dtype: torch.dtype, shape: tuple[int, int, int, int]) -> None:
    out, inn, T, rank = shape
    u, v = rand(out, rank, dtype=dtype, seed=18), rand(rank, inn, dtype=dtype, seed=19)
    x, bias = rand(T, inn, dtype=dtype, seed=20), rand(out, dtype=dtype, seed=21)
    close(lowrank.lowrank_linear(x, u, v, bias), d(x) @ (d(u) @ d(v)).T + d(bias), dtype)
    xt = rand(T, out, dtype=dtype, seed=22)  # strided factors, as the x-gradient passes them
    close(lowrank.lowrank_linear(xt, v.T, u.T), d(xt) @ (d(v.T) @ d(u.T)).T, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [(6, 8), (16, 16)])
def test_blocksparse_kernel(dtype: torch.dtype, block: tuple[int, int]) -> None:
    bh, bw = block
    out, inn = 4 * bh, 3 * bw
    rows, cols = torch.tensor([0, 0, 2, 3, 3, 3]), torch.tensor([1, 2, 0, 0, 1, 2])  # block row 1 stores nothing
    blocks = rand(6, bh, bw, dtype=dtype, seed=23)
    x, bias = rand(2, 5, inn, dtype=dtype, seed=24), rand(out, dtype=dtype, seed=25)
    tiles = torch.zeros(4, 3, bh, bw, dtype=torch.float64).index_put((rows, cols), d(blocks))
    w = tiles.permute(0, 2, 1, 3).reshape(out, inn)
    close(blocksparse.blocksparse_linear(x, blocks, rows, cols, out, bias), d(x) @ w.T + d(bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kron_embedding_kernel(dtype: torch.dtype) -> None:
    a, b = rand(3, 4, 5, dtype=dtype, seed=26), rand(3, 6, 8, dtype=dtype, seed=27)
    index = torch.tensor([[0, 5, 23], [7, 7, 12]])
    close(kron_embedding.kron_embedding(index, a, b), dense_kron(a, b)[index], dtype)
    close(kron_embedding.kron_embedding(index.int()[0], a[:1], b[:1]), dense_kron(a[:1], b[:1])[index[0]], dtype)


def test_wrappers_reject_bad_input() -> None:
    a, b = rand(2, 4, 5, dtype=torch.float32, seed=28), rand(2, 6, 8, dtype=torch.float32, seed=29)
    with pytest.raises(OpInputError, match=r"kron_linear.*\(3, 41\)"):
        kron.kron_linear(torch.randn(3, 41), a, b)
    with pytest.raises(OpInputError, match="dtype"):
        kron.kron_linear(torch.randn(3, 40, dtype=torch.float16), a, b)
    with pytest.raises(backend.KernelUnavailable, match="float64"):
        kron.kron_linear(torch.randn(3, 40, dtype=torch.float64), a.double(), b.double())
    rows, cols, values = entries(24, 40, 10, torch.float32)
    with pytest.raises(OpInputError, match="sorted"):
        sparse.sparse_linear(torch.randn(3, 40), rows.flip(0), cols, values, 24)
    with pytest.raises(OpInputError, match="cols"):
        doped_kron.doped_kron_linear(torch.randn(3, 40), a, b, rows, cols + 40, values)
    with pytest.raises(OpInputError, match="index"):
        kron_embedding.kron_embedding(torch.tensor([24]), a, b)
    with pytest.raises(backend.KernelUnavailable, match="rank"):
        lowrank.lowrank_linear(torch.randn(2, 300), torch.randn(300, 257), torch.randn(257, 300))


@pytest.mark.slow
def test_ops_dispatch_to_the_kernels_when_forced() -> None:
    """``use_kernels("triton")`` sends the ops (and their backward) to the kernels on CPU tensors."""
    w = rand(24, 40, dtype=torch.float32, seed=30)
    x = rand(2, 3, 40, dtype=torch.float32, seed=31)
    index = torch.tensor([[1, 2], [23, 0]])
    specs = [
        KroneckerSpec(a_shape=(4, 5), terms=2), LowRankSpec(rank=4), BlockSparseSpec(block=(8, 8), density=0.5),
        DopedSpec(base=KroneckerSpec(a_shape=(4, 5)), density=0.05), DopedSpec(density=0.1),
    ]
    for spec in specs:
        f = fit(w, spec)
        results = {}
        for mode in ("torch", "triton"):
            xr = x.clone().requires_grad_()
            with backend.use_kernels(mode):  # type: ignore[arg-type]
                y = f(xr)
                rows = f.rows(index)
                y.square().sum().backward()
            results[mode] = (y.detach(), rows.detach(), xr.grad)
        for got, want in zip(results["triton"], results["torch"], strict=True):
            close(got, want.double(), torch.float32)
    calls = []
    original = kron.kron_linear
    try:
        kron.kron_linear = lambda *args, **kw: calls.append(1) or original(*args, **kw)  # type: ignore[assignment]
        with backend.use_kernels("triton"):
            ops.kron_linear(x, *(t for t in (fit(w, specs[0]).a.detach(), fit(w, specs[0]).b.detach())))
    finally:
        kron.kron_linear = original  # type: ignore[assignment]
    assert calls, "use_kernels('triton') did not reach the Triton wrapper"
