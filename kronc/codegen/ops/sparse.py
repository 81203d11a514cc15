"""``kronc::sparse_linear``: ``x @ S.T`` for a sparse ``(out, in)`` matrix ``S`` given as entries.

``S[rows[k], cols[k]] = values[k]``, entries listed in row-major order (``rows`` sorted ascending,
as `SparseIndex.decode` gives them). The overlay of doped formats with a low-rank base or none
(plain magnitude pruning) runs through this op. The torch implementation gathers ``x[:, cols]`` and
scatter-adds into the output rows (`overlay_apply`); on CPU it uses torch's CSR sparse-dense matmul
on the same entries, or, for dense enough matrices and many tokens, scatters the entries into a
transient dense ``(out, in)`` matrix and runs one GEMM (`densify_pays`); the Triton kernel walks
compressed rows.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ...reference import sparse as reference_sparse
from ...reference.sparse import overlay_apply
from ..backend import use_triton
from ..checks.common import (
    OpCtx,
    is_traced,
    mark_checked,
    needs_grad,
    transpose_order,
)
from ..checks.sparse import check_sparse
from ._registry import kronc_op


def csr_product(x: Tensor, rows: Tensor, cols: Tensor, values: Tensor, out_features: int) -> Tensor | None:
    """``x @ S.T`` by torch's CSR sparse-dense matmul, on CPU float32/float64 outside tracing; else None.

    Same products, summed row by row in entry order as the gather/scatter reference, at a
    fraction of its memory traffic (it never materialises the ``tokens x nnz`` products).
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or is_traced(x, values):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    bounds = torch.arange(out_features + 1, dtype=rows.dtype)
    crow = torch.searchsorted(rows, bounds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        s = torch.sparse_csr_tensor(
            crow, cols.to(crow.dtype), values, (out_features, x2.shape[1]), check_invariants=False
        )
        y = (s @ x2.T).T
    return y.reshape(*x.shape[:-1], out_features)


# CPU cost model (fitted timings: benchmarks/results/design_measurements.md, "sparse products"): CSR SpMM
# costs _CSR_PER_ENTRY dense-GEMM multiply-adds per stored entry; scattering the entries into a dense
# matrix costs _SCATTER_ROWS GEMM token-rows. Densify when  tokens * (_CSR_PER_ENTRY * density - 1) > _SCATTER_ROWS.
_CSR_PER_ENTRY = 8.4
_SCATTER_ROWS = 77.0


def densify_pays(tokens: int, nnz: int, out_features: int, in_features: int) -> bool:
    """Whether scatter-to-dense plus one GEMM beats the CSR product: dense enough matrices at enough tokens."""
    numel = out_features * in_features
    return numel > 0 and tokens * (_CSR_PER_ENTRY * nnz / numel - 1.0) > _SCATTER_ROWS


def densified(t: Tensor, rows: Tensor, cols: Tensor, values: Tensor, out_features: int, in_features: int
              ) -> Tensor | None:
    """The dense ``(out, in)`` matrix of the entries, where `densify_pays` for ``t``'s tokens (CPU, float,
    not traced); else None. ``t`` is the operand the matrix multiplies (its last dim is summed over)."""
    if t.device.type != "cpu" or not t.dtype.is_floating_point or is_traced(t, values):
        return None
    if not densify_pays(t.numel() // max(1, t.shape[-1]), values.numel(), out_features, in_features):
        return None
    return values.new_zeros(out_features, in_features).index_put((rows, cols), values)


def densified_product(x: Tensor, rows: Tensor, cols: Tensor, values: Tensor, out_features: int) -> Tensor | None:
    """``x @ S.T`` through a transient dense ``S`` where `densified` gives one; else None."""
    s = densified(x, rows, cols, values, out_features, x.shape[-1])
    return None if s is None else x @ s.T


def overlay_product(x: Tensor, rows: Tensor, cols: Tensor, values: Tensor, out_features: int) -> Tensor:
    """``x @ S.T``: a transient dense GEMM or the CSR product where they apply, else `overlay_apply`."""
    y = densified_product(x, rows, cols, values, out_features)
    if y is None:
        y = csr_product(x, rows, cols, values, out_features)
    return y if y is not None else overlay_apply(x, rows, cols, values, out_features, chunk=not is_traced(x))


def sparse_linear_torch(
    x: Tensor, rows: Tensor, cols: Tensor, values: Tensor, out_features: int, bias: Tensor | None = None
) -> Tensor:
    y = overlay_product(x, rows, cols, values, out_features)
    return y if bias is None else y + bias


@kronc_op
def sparse_linear(
    x: Tensor, rows: Tensor, cols: Tensor, values: Tensor, out_features: int, bias: Tensor | None = None
) -> Tensor:
    """``x @ S.T + bias`` with ``S[rows[k], cols[k]] = values[k]`` of shape ``(out_features, x.shape[-1])``."""
    check_sparse("sparse_linear", x, rows, cols, values, out_features, bias)
    if use_triton("sparse_linear", x):
        from ..triton.sparse import sparse_linear as kernel

        return kernel(x, rows, cols, values, out_features, bias)
    return sparse_linear_torch(x, rows, cols, values, out_features, bias).contiguous()


@sparse_linear.register_fake
def _(
    x: Tensor, rows: Tensor, cols: Tensor, values: Tensor, out_features: int, bias: Tensor | None = None
) -> Tensor:
    check_sparse("sparse_linear", x, rows, cols, values, out_features, bias)
    return x.new_empty((*x.shape[:-1], out_features))


def transposed_entries(
    rows: Tensor, cols: Tensor, values: Tensor, out_features: int, in_features: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Entries of ``S.T`` in row-major order: ``(cols, rows, values)`` sorted by column."""
    perm = transpose_order(rows, cols)
    rows_t, cols_t = cols[perm], rows[perm]
    mark_checked(rows_t, in_features, True)
    mark_checked(cols_t, out_features, False)
    return rows_t, cols_t, values[perm]


_DENSE_GRAD_ELEMENTS = 1 << 26  # largest (out x in) product formed for the values' gradient


def values_grad(g: Tensor, x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``d values[k] = Σ_t g[t, rows[k]] * x[t, cols[k]]``.

    Read off the dense product ``gᵀ x`` at the kept positions when that matrix is not huge: one GEMM
    beats gathering ``tokens x nnz`` products at every density we store (figures in
    ``benchmarks/results/design_measurements.md``). Else (and while tracing) gathered in token chunks.
    """
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    nnz = rows.numel()
    if is_traced(g, x):
        return (g2[:, rows] * x2[:, cols]).sum(0)
    if g2.shape[1] * x2.shape[1] <= _DENSE_GRAD_ELEMENTS:
        return (g2.T @ x2)[rows, cols]
    out = x2.new_zeros(nnz)
    step = max(1, reference_sparse.CHUNK_ELEMENTS // max(1, nnz))
    for s in range(0, x2.shape[0], step):
        out += (g2[s : s + step, rows] * x2[s : s + step, cols]).sum(0)
    return out


def sparse_input_grad(
    g: Tensor, rows: Tensor, cols: Tensor, values: Tensor, out_features: int, in_features: int
) -> Tensor:
    s = densified(g, rows, cols, values, out_features, in_features)
    if s is not None:  # g @ S through a transient dense S: no transposed copy of the entries to sort
        return g @ s
    rows_t, cols_t, values_t = transposed_entries(rows, cols, values, out_features, in_features)
    return torch.ops.kronc.sparse_linear(g, rows_t, cols_t, values_t, in_features)


def _setup(ctx: OpCtx, inputs: tuple, output: Tensor) -> None:
    x, rows, cols, values, out_features, _ = inputs
    ctx.save_for_backward(x, rows, cols, values)
    ctx.out_features = out_features


def _backward(ctx: OpCtx, g: Tensor) -> tuple[Tensor | None, ...]:
    x, rows, cols, values = ctx.saved_tensors
    need = needs_grad(ctx, 6)
    gx = sparse_input_grad(g, rows, cols, values, ctx.out_features, x.shape[-1]) if need[0] else None
    gv = values_grad(g, x, rows, cols) if need[3] else None
    gb = g.reshape(-1, g.shape[-1]).sum(0) if need[5] else None
    return gx, None, None, gv, None, gb


sparse_linear.register_autograd(_backward, setup_context=_setup)
