"""The ``kronc::`` custom ops on their torch path: numerics, gradients, input checks, compile and export.

Tolerances: float64 results against the dense product ``x @ W.T + b`` to ``rtol=1e-10``; float32 to
``rtol=1e-5, atol=1e-5``; the ops' torch path against the format references bit for bit
(``torch.equal``; the sparse overlay, computed as a CSR product on CPU, to ``1e-12``); gradients by ``torch.autograd.gradcheck`` on float64 (its defaults: ``eps=1e-6``,
``atol=1e-5``, ``rtol=1e-3``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import kronc.codegen.ops  # noqa: F401  (registers torch.ops.kronc.*)
from kronc.codegen import backend
from kronc.codegen.ops import OpInputError
from kronc.formats import BlockSparseSpec, DopedSpec, KroneckerSpec, LowRankSpec, fit
from kronc.reference.blocksparse import blocksparse_apply
from kronc.reference.kronecker import kronecker_apply, kronecker_rows
from kronc.reference.lowrank import lowrank_apply
from kronc.reference.sparse import overlay_apply

ops = torch.ops.kronc
F64 = torch.float64


@pytest.fixture(autouse=True)
def _torch_kernels():  # these tests pin the torch implementation, whatever KRONC_KERNELS says
    with backend.use_kernels("torch"):
        yield


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kron_args(R: int, m1: int, n1: int, m2: int, n2: int, dtype: torch.dtype = F64, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    return torch.randn(R, m1, n1, generator=g, dtype=dtype), torch.randn(R, m2, n2, generator=g, dtype=dtype)


def entries(out: int, inn: int, nnz: int, dtype: torch.dtype = F64, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """``nnz`` distinct random positions in row-major order, with random values."""
    g = _gen(seed)
    flat = torch.randperm(out * inn, generator=g)[:nnz].sort().values
    return flat // inn, flat % inn, torch.randn(nnz, generator=g, dtype=dtype)


def dense_sparse(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return values.new_zeros(shape).index_put((rows, cols), values)


def dense_kron(a: Tensor, b: Tensor) -> Tensor:
    return sum(torch.kron(a[r], b[r]) for r in range(a.shape[0]))  # type: ignore[return-value]


def dense_blocks(blocks: Tensor, rows: Tensor, cols: Tensor, out: int, inn: int) -> Tensor:
    _, bh, bw = blocks.shape
    tiles = blocks.new_zeros(out // bh, inn // bw, bh, bw).index_put((rows, cols), blocks)
    return tiles.permute(0, 2, 1, 3).reshape(out, inn)


LEADS = [(), (5,), (2, 3), (0,)]


# ---- numerics against the dense product ------------------------------------------------------


@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("dims", [(1, 4, 5, 6, 8), (3, 2, 3, 5, 7), (2, 6, 1, 1, 9)])
def test_kron_linear_matches_dense(lead: tuple[int, ...], dims: tuple[int, ...]) -> None:
    R, m1, n1, m2, n2 = dims
    a, b = kron_args(*dims)
    x = torch.randn(*lead, n1 * n2, dtype=F64)
    bias = torch.randn(m1 * m2, dtype=F64)
    w = dense_kron(a, b)
    torch.testing.assert_close(ops.kron_linear(x, a, b), x @ w.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ops.kron_linear(x, a, b, bias), x @ w.T + bias, rtol=1e-10, atol=1e-10)
    assert torch.equal(ops.kron_linear(x, a, b), kronecker_apply(x, a, b))


@pytest.mark.parametrize("lead", LEADS)
def test_doped_kron_linear_matches_dense(lead: tuple[int, ...]) -> None:
    a, b = kron_args(2, 4, 5, 6, 8)
    rows, cols, values = entries(24, 40, 30)
    x = torch.randn(*lead, 40, dtype=F64)
    bias = torch.randn(24, dtype=F64)
    w = dense_kron(a, b) + dense_sparse(rows, cols, values, (24, 40))
    y = ops.doped_kron_linear(x, a, b, rows, cols, values, bias)
    torch.testing.assert_close(y, x @ w.T + bias, rtol=1e-10, atol=1e-10)
    ref = kronecker_apply(x, a, b) + overlay_apply(x, rows, cols, values, 24)
    torch.testing.assert_close(ops.doped_kron_linear(x, a, b, rows, cols, values), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lead", LEADS)
def test_sparse_linear_matches_dense(lead: tuple[int, ...]) -> None:
    rows, cols, values = entries(24, 40, 50)
    x = torch.randn(*lead, 40, dtype=F64)
    bias = torch.randn(24, dtype=F64)
    w = dense_sparse(rows, cols, values, (24, 40))
    torch.testing.assert_close(ops.sparse_linear(x, rows, cols, values, 24, bias), x @ w.T + bias, rtol=1e-10, atol=1e-10)
    ref = overlay_apply(x, rows, cols, values, 24)  # the op's CPU path is a CSR product of the same entries
    torch.testing.assert_close(ops.sparse_linear(x, rows, cols, values, 24), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.sparse_linear(x.float(), rows, cols, values.float(), 24), ref.float())
    # int32 indices and no entries at all
    y32 = ops.sparse_linear(x, rows.int(), cols.int(), values, 24)
    torch.testing.assert_close(y32, x @ w.T, rtol=1e-10, atol=1e-10)
    empty = torch.zeros(0, dtype=torch.int64)
    assert torch.equal(ops.sparse_linear(x, empty, empty, values[:0], 24), x.new_zeros(*lead, 24))


@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("rank", [1, 7])
def test_lowrank_linear_matches_dense(lead: tuple[int, ...], rank: int) -> None:
    g = _gen(2)
    u, v = torch.randn(24, rank, generator=g, dtype=F64), torch.randn(rank, 40, generator=g, dtype=F64)
    x = torch.randn(*lead, 40, dtype=F64)
    bias = torch.randn(24, dtype=F64)
    torch.testing.assert_close(ops.lowrank_linear(x, u, v, bias), x @ (u @ v).T + bias, rtol=1e-10, atol=1e-10)
    assert torch.equal(ops.lowrank_linear(x, u, v), lowrank_apply(x, u, v))


@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("block", [(4, 8), (6, 5)])
def test_blocksparse_linear_matches_dense(lead: tuple[int, ...], block: tuple[int, int]) -> None:
    bh, bw = block
    gr, gc = 24 // bh, 40 // bw
    rows, cols, _ = entries(gr, gc, 9, seed=3)
    blocks = torch.randn(9, bh, bw, dtype=F64)
    x = torch.randn(*lead, 40, dtype=F64)
    bias = torch.randn(24, dtype=F64)
    w = dense_blocks(blocks, rows, cols, 24, 40)
    y = ops.blocksparse_linear(x, blocks, rows, cols, 24, bias)
    torch.testing.assert_close(y, x @ w.T + bias, rtol=1e-10, atol=1e-10)
    assert torch.equal(ops.blocksparse_linear(x, blocks, rows, cols, 24), blocksparse_apply(x, blocks, rows, cols, 24))


@pytest.mark.parametrize("index_shape", [(), (7,), (2, 3), (0,)])
def test_kron_embedding_matches_dense(index_shape: tuple[int, ...]) -> None:
    a, b = kron_args(3, 4, 5, 6, 8)
    index = torch.randint(0, 24, index_shape, generator=_gen(4))
    out = ops.kron_embedding(index, a, b)
    assert out.shape == (*index_shape, 40)
    torch.testing.assert_close(out, dense_kron(a, b)[index], rtol=1e-10, atol=1e-10)
    assert torch.equal(out, kronecker_rows(index, a, b))
    torch.testing.assert_close(ops.kron_embedding(index.int(), a, b), out)


def test_float32_and_noncontiguous_inputs() -> None:
    a, b = kron_args(2, 4, 5, 6, 8, dtype=torch.float32)
    x = torch.randn(40, 6).T  # (6, 40), feature stride 6
    assert not x.is_contiguous()
    w = dense_kron(a, b)
    torch.testing.assert_close(ops.kron_linear(x, a, b), x @ w.T, rtol=1e-5, atol=1e-5)
    at, bt = a.transpose(1, 2), b.transpose(1, 2)  # factors given as views
    x24 = torch.randn(3, 24)
    torch.testing.assert_close(ops.kron_linear(x24, at, bt), x24 @ dense_kron(at, bt).T, rtol=1e-5, atol=1e-5)
    u, v = torch.randn(24, 3), torch.randn(3, 40)
    torch.testing.assert_close(ops.lowrank_linear(x, u, v), x @ (u @ v).T, rtol=1e-5, atol=1e-5)


# ---- gradients ------------------------------------------------------------------------------


def _req(*ts: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in ts)


def test_gradcheck_kron_linear() -> None:
    for dims in [(2, 2, 3, 3, 2), (1, 3, 1, 2, 4), (2, 3, 4, 2, 2)]:
        a, b = kron_args(*dims)
        x = torch.randn(2, 3, dims[2] * dims[4], dtype=F64)
        bias = torch.randn(dims[1] * dims[3], dtype=F64)
        assert torch.autograd.gradcheck(ops.kron_linear, _req(x, a, b, bias))
        assert torch.autograd.gradcheck(lambda x, a, b: ops.kron_linear(x, a, b), _req(x, a, b))


@pytest.mark.slow
def test_gradcheck_doped_kron_linear() -> None:
    a, b = kron_args(2, 2, 3, 3, 2)
    rows, cols, values = entries(6, 6, 8)
    x, bias = torch.randn(4, 6, dtype=F64), torch.randn(6, dtype=F64)
    args = _req(x, a, b, rows, cols, values, bias)
    assert torch.autograd.gradcheck(ops.doped_kron_linear, args)


@pytest.mark.slow
def test_gradcheck_sparse_linear() -> None:
    rows, cols, values = entries(5, 7, 12)
    x, bias = torch.randn(2, 3, 7, dtype=F64), torch.randn(5, dtype=F64)
    xr, vr, br = _req(x, values, bias)
    assert torch.autograd.gradcheck(lambda x, v, b: ops.sparse_linear(x, rows, cols, v, 5, b), (xr, vr, br))


@pytest.mark.slow
def test_sparse_linear_densified_path_matches_the_csr_path() -> None:
    """Dense enough and many tokens: the CPU op scatters into a dense matrix; same numbers, same grads."""
    from kronc.codegen.ops.sparse import csr_product, densified_product, densify_pays

    assert not densify_pays(10_000, 5, 16, 16)  # 2% density: CSR always
    assert not densify_pays(4, 128, 16, 16)  # 50% density but few tokens: CSR
    assert densify_pays(512, 128, 16, 16)
    rows, cols, values = entries(16, 16, 128)
    x = torch.randn(8, 64, 16, dtype=F64)  # 512 tokens: densified, as asserted above
    assert densified_product(x, rows, cols, values, 16) is not None
    ref = csr_product(x, rows, cols, values, 16)
    assert ref is not None
    torch.testing.assert_close(ops.sparse_linear(x, rows, cols, values, 16), ref, rtol=1e-12, atol=1e-12)
    w = dense_sparse(rows, cols, values, (16, 16)).requires_grad_(True)
    xr, vr = _req(x, values)
    ops.sparse_linear(xr, rows, cols, vr, 16).square().sum().backward()
    xw = x.clone().requires_grad_(True)
    (xw @ w.T).square().sum().backward()
    assert xr.grad is not None and vr.grad is not None and w.grad is not None and xw.grad is not None
    torch.testing.assert_close(xr.grad, xw.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vr.grad, w.grad[rows, cols], rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x, v: ops.sparse_linear(x, rows, cols, v, 16), _req(x[:, :8], values))


def test_gradcheck_lowrank_linear() -> None:
    g = _gen(5)
    x, u, v, bias = (torch.randn(*s, generator=g, dtype=F64) for s in [(3, 7), (5, 2), (2, 7), (5,)])
    assert torch.autograd.gradcheck(ops.lowrank_linear, _req(x, u, v, bias))


def test_gradcheck_blocksparse_linear() -> None:
    rows, cols, _ = entries(3, 2, 4, seed=6)
    blocks = torch.randn(4, 2, 3, dtype=F64)
    x, bias = torch.randn(2, 2, 6, dtype=F64), torch.randn(6, dtype=F64)
    xr, blr, br = _req(x, blocks, bias)
    assert torch.autograd.gradcheck(lambda x, bl, b: ops.blocksparse_linear(x, bl, rows, cols, 6, b), (xr, blr, br))


def test_gradcheck_kron_embedding() -> None:
    a, b = kron_args(2, 3, 2, 2, 3)
    index = torch.tensor([[0, 5, 3], [5, 5, 1]])  # repeated rows accumulate
    ar, br = _req(a, b)
    assert torch.autograd.gradcheck(lambda a, b: ops.kron_embedding(index, a, b), (ar, br))


def test_format_gradients_match_autograd_through_the_dense_weight() -> None:
    w = torch.randn(24, 40, dtype=F64)
    x, index = torch.randn(3, 40, dtype=F64), torch.tensor([[1, 2], [2, 23]])
    for spec in [
        KroneckerSpec(a_shape=(4, 5), terms=2), LowRankSpec(rank=4), BlockSparseSpec(block=(8, 8), density=0.5),
        DopedSpec(base=KroneckerSpec(a_shape=(4, 5)), density=0.05), DopedSpec(base=LowRankSpec(rank=3), density=0.05),
        DopedSpec(density=0.1),
    ]:
        f = fit(w, spec)
        pairs = [
            (f(x).square().sum(), (x @ f.to_dense().T).square().sum()),
            (f.rows(index).square().sum(), f.to_dense()[index].square().sum()),
        ]
        for via_ops, via_dense in pairs:
            got = torch.autograd.grad(via_ops, list(f.parameters()))
            want = torch.autograd.grad(via_dense, list(f.parameters()))
            for g, r in zip(got, want, strict=True):
                torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=spec.describe())


# ---- input checks ---------------------------------------------------------------------------


def _raises(fn: Callable[[], object], *fragments: str) -> None:
    with pytest.raises(OpInputError) as info:
        fn()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_bad_shapes_name_the_op_and_the_shapes() -> None:
    a, b = kron_args(2, 4, 5, 6, 8)
    _raises(lambda: ops.kron_linear(torch.randn(3, 41, dtype=F64), a, b), "kronc::kron_linear", "(3, 41)", "(2, 4, 5)", "(2, 6, 8)")
    _raises(lambda: ops.kron_linear(torch.randn(3, 40, dtype=F64), a, b[:1]), "kron_linear", "2 terms", "1")
    _raises(lambda: ops.kron_linear(torch.randn(40, dtype=F64), a[0], b), "kron_linear", "(4, 5)")
    _raises(lambda: ops.kron_linear(torch.randn(40, dtype=F64), a, b, torch.randn(23, dtype=F64)), "bias", "(24,)", "(23,)")
    u, v = torch.randn(24, 3, dtype=F64), torch.randn(4, 40, dtype=F64)
    _raises(lambda: ops.lowrank_linear(torch.randn(2, 40, dtype=F64), u, v), "kronc::lowrank_linear", "(24, 3)", "(4, 40)")
    _raises(lambda: ops.lowrank_linear(torch.randn(2, 39, dtype=F64), u, v[:3]), "lowrank_linear", "(2, 39)", "(3, 40)")
    blocks = torch.randn(2, 5, 8, dtype=F64)
    idx = torch.tensor([0, 1])
    _raises(lambda: ops.blocksparse_linear(torch.randn(3, 40, dtype=F64), blocks, idx, idx, 24), "blocksparse_linear", "(5, 8)", "24x40")
    rows, cols, values = entries(24, 40, 10)
    _raises(lambda: ops.sparse_linear(torch.randn(40, dtype=F64), rows, cols[:9], values, 24), "sparse_linear", "(10,)", "(9,)")
    _raises(lambda: ops.kron_embedding(torch.tensor([0]), a, b[:, :, :1].expand(2, 6, 8)[:1]), "kron_embedding")


def test_bad_dtypes_and_devices() -> None:
    a, b = kron_args(2, 4, 5, 6, 8)
    x32 = torch.randn(3, 40)
    _raises(lambda: ops.kron_linear(x32, a, b), "kron_linear", "float64", "float32")
    _raises(lambda: ops.kron_linear(torch.randn(3, 40, dtype=F64), a, b.float()), "kron_linear")
    _raises(lambda: ops.kron_linear(torch.randint(0, 3, (3, 40)), a, b), "floating point")
    _raises(lambda: ops.kron_linear(torch.randn(3, 40, dtype=F64), a, b.to("meta")), "kron_linear", "meta")
    rows, cols, values = entries(24, 40, 10)
    x = torch.randn(3, 40, dtype=F64)
    _raises(lambda: ops.sparse_linear(x, rows.float(), cols, values, 24), "rows", "int32 or int64")
    _raises(lambda: ops.sparse_linear(x, rows, cols, values.float(), 24), "values", "float32")
    _raises(lambda: ops.kron_embedding(torch.tensor([0.0]), a, b), "index", "int32 or int64")


def test_bad_indices_are_caught_not_silently_wrong() -> None:
    rows, cols, values = entries(24, 40, 10)
    x = torch.randn(3, 40, dtype=F64)
    _raises(lambda: ops.sparse_linear(x, rows.flip(0), cols, values, 24), "rows", "sorted")
    _raises(lambda: ops.sparse_linear(x, rows, cols + 40, values, 24), "cols", "[0, 40)")
    _raises(lambda: ops.sparse_linear(x, rows, cols, values, 5), "rows", "[0, 5)")
    a, b = kron_args(2, 4, 5, 6, 8)
    _raises(lambda: ops.kron_embedding(torch.tensor([24]), a, b), "index", "[0, 24)")
    _raises(lambda: ops.kron_embedding(torch.tensor([-1]), a, b), "index", "[-1, -1]")
    blocks = torch.randn(2, 6, 8, dtype=F64)
    _raises(lambda: ops.blocksparse_linear(x, blocks, torch.tensor([1, 0]), torch.tensor([0, 0]), 24), "rows", "sorted")
    _raises(lambda: ops.blocksparse_linear(x, blocks, torch.tensor([0, 1]), torch.tensor([0, 5]), 24), "cols", "[0, 5)")


def test_index_checks_are_remembered_and_redone_after_mutation() -> None:
    rows, cols, values = entries(24, 40, 10)
    x = torch.randn(3, 40, dtype=F64)
    ops.sparse_linear(x, rows, cols, values, 24)
    cols.add_(40)  # in-place change bumps the version counter: checked again
    _raises(lambda: ops.sparse_linear(x, rows, cols, values, 24), "cols")


def test_kernel_mode_selection() -> None:
    assert backend.kernel_mode() == "torch"
    with backend.use_kernels("auto"):
        assert backend.kernel_mode() == "auto"
        assert not backend.use_triton("kron_linear", torch.randn(2))  # CPU tensors: torch in auto
    assert backend.kernel_mode() == "torch"
    with pytest.raises(ValueError, match="one of"):
        backend.use_kernels("cuda")  # type: ignore[arg-type]
    with backend.use_kernels("triton"), pytest.raises(backend.KernelUnavailable, match="kron_linear"):
        a, b = kron_args(1, 2, 2, 2, 2)
        ops.kron_linear(torch.randn(3, 4, dtype=F64), a, b)  # float64 has no Triton kernel: an error, no fallback


# ---- fake tensors, torch.compile, torch.export ----------------------------------------------


class AllOps(nn.Module):
    """Calls every op once; indices are buffers, factors parameters."""

    def __init__(self) -> None:
        super().__init__()
        a, b = kron_args(2, 4, 5, 6, 8, dtype=torch.float32)
        self.a, self.b = nn.Parameter(a), nn.Parameter(b)
        rows, cols, values = entries(24, 40, 20, dtype=torch.float32)
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        self.values = nn.Parameter(values)
        self.u, self.v = nn.Parameter(torch.randn(24, 3)), nn.Parameter(torch.randn(3, 24))
        brows, bcols, _ = entries(4, 3, 5, seed=7)
        self.register_buffer("brows", brows)
        self.register_buffer("bcols", bcols)
        self.blocks = nn.Parameter(torch.randn(5, 6, 8))
        self.bias = nn.Parameter(torch.randn(24))

    def forward(self, x: Tensor, index: Tensor) -> Tensor:
        y = ops.kron_linear(x, self.a, self.b, self.bias)
        y = y + ops.doped_kron_linear(x, self.a, self.b, self.rows, self.cols, self.values)
        y = y + ops.sparse_linear(x, self.rows, self.cols, self.values, 24, self.bias)
        y = y + ops.blocksparse_linear(x, self.blocks, self.brows, self.bcols, 24)
        z = ops.lowrank_linear(y, self.u, self.v)
        return z + ops.kron_embedding(index, self.a, self.b)[..., :24]


OP_NAMES = {"kron_linear", "doped_kron_linear", "sparse_linear", "lowrank_linear", "blocksparse_linear", "kron_embedding"}


def test_fake_tensor_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = AllOps()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(2, 7, 40))
        index = mode.from_tensor(torch.randint(0, 24, (2, 7)))
        out = m(x, index)
        assert out.shape == (2, 7, 24)
        with pytest.raises(OpInputError, match="kron_linear"):
            ops.kron_linear(mode.from_tensor(torch.randn(2, 41)), m.a, m.b)


def test_opcheck() -> None:
    a, b = kron_args(2, 2, 3, 3, 2, dtype=torch.float32)
    rows, cols, values = entries(6, 6, 8, dtype=torch.float32)
    x, bias = torch.randn(4, 6), torch.randn(6)
    blocks = torch.randn(3, 2, 3)
    cases = [
        (ops.kron_linear.default, (x, a, b, bias)),
        (ops.doped_kron_linear.default, (x, a, b, rows, cols, values, bias)),
        (ops.sparse_linear.default, (x, rows, cols, values, 6, None)),
        (ops.lowrank_linear.default, (x, torch.randn(6, 2), torch.randn(2, 6), bias)),
        (ops.blocksparse_linear.default, (x, blocks, torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1]), 6, bias)),
        (ops.kron_embedding.default, (torch.tensor([[1, 2], [3, 5]]), a, b)),
    ]
    for op, args in cases:
        args = tuple(t.requires_grad_() if isinstance(t, Tensor) and t.is_floating_point() else t for t in args)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.slow
def test_compile_fullgraph_matches_eager_with_grads() -> None:
    torch._dynamo.reset()
    m = AllOps()
    x, index = torch.randn(2, 5, 40), torch.randint(0, 24, (2, 5))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x, index)
    ref = m(x, index)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref.square().sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-3, msg=n)


@pytest.mark.slow
def test_compile_inductor_kron_linear() -> None:
    torch._dynamo.reset()
    a, b = kron_args(2, 4, 5, 6, 8, dtype=torch.float32)
    x = torch.randn(3, 40)

    def f(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return torch.relu(ops.kron_linear(x, a, b)) * 2

    out = torch.compile(f, fullgraph=True, backend="inductor")(x, a, b)
    torch.testing.assert_close(out, f(x, a, b), rtol=1e-5, atol=1e-5)


def _kronc_targets(gm: torch.fx.GraphModule) -> set[str]:
    return {
        node.target.name().split("::")[1].split(".")[0]
        for node in gm.graph.nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "kronc"
    }


@pytest.mark.slow
def test_export_keeps_kronc_ops() -> None:
    m = AllOps()
    x, index = torch.randn(2, 5, 40), torch.randint(0, 24, (2, 5))
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (x, index), dynamic_shapes={"x": {0: batch}, "index": {0: batch}})
    assert _kronc_targets(ep.graph_module) == OP_NAMES
    torch.testing.assert_close(ep.module()(x, index), m(x, index))
    x3, index3 = torch.randn(3, 5, 40), torch.randint(0, 24, (3, 5))
    torch.testing.assert_close(ep.module()(x3, index3), m(x3, index3))


def test_export_format_modules() -> None:
    w = torch.randn(24, 40)
    expected = {
        "kronecker": {"kron_linear"}, "lowrank": {"lowrank_linear"}, "blocksparse": {"blocksparse_linear"},
        "doped": {"doped_kron_linear"},
    }
    for spec in [
        KroneckerSpec(a_shape=(4, 5), terms=2), LowRankSpec(rank=4), BlockSparseSpec(block=(8, 8), density=0.5),
        DopedSpec(base=KroneckerSpec(a_shape=(4, 5)), density=0.05),
    ]:
        f = fit(w, spec)
        x = torch.randn(3, 40)
        f(x)  # decode the sparse index once, as a model's first call does
        ep = torch.export.export(f, (x,))
        assert _kronc_targets(ep.graph_module) == expected[spec.kind], spec.describe()
        torch.testing.assert_close(ep.module()(x), f(x))
