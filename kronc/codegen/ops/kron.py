"""``kronc::kron_linear`` and ``kronc::kron_embedding``: a weight ``W = Σ_r A_r ⊗ B_r`` applied or looked up.

``a`` is ``(R, m1, n1)`` and ``b`` is ``(R, m2, n2)``; ``W`` is ``(m1*m2, n1*n2)`` and is never built:
the linear is two small matmuls per term on ``x`` reshaped to ``(n1, n2)``, a row of ``W`` is the
outer product of one row of ``A_r`` and one of ``B_r``. The torch implementations are the format's
references (`kronecker_apply`, `kronecker_rows`); gradients are explicit formulas that build no
``W`` either.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...reference.kronecker import b_first, contraction_costs, kronecker_apply, kronecker_rows
from ..backend import use_triton
from ..checks.common import (
    OpCtx,
    needs_grad,
)
from ..checks.kron import check_kron, check_kron_embedding
from ._registry import kronc_op

# ---- checks ---------------------------------------------------------------------------------


def _empty_out(x: Tensor, out_features: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    return y if bias is None else y + bias


# ---- kron_linear ----------------------------------------------------------------------------


def kron_linear_torch(x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    return _add_bias(kronecker_apply(x, a, b), bias)


@kronc_op
def kron_linear(x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ (Σ_r a[r] ⊗ b[r]).T + bias`` for ``x`` of shape ``(..., n1*n2)``."""
    check_kron("kron_linear", x, a, b, bias)
    if use_triton("kron_linear", x):
        from ..triton.kron import kron_linear as kernel

        return kernel(x, a, b, bias)
    return kron_linear_torch(x, a, b, bias).contiguous()


@kron_linear.register_fake
def _(x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    out_features, _ = check_kron("kron_linear", x, a, b, bias)
    return _empty_out(x, out_features)


def kron_factor_grads(
    g: Tensor, x: Tensor, a: Tensor, b: Tensor, need_a: bool, need_b: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``Σ_t <G_t, Σ_r A_r X_t B_r^T>`` wrt ``a`` and ``b`` (no dense ``W``).

    ``dA_r = Σ_t G_t B_r X_t^T`` and ``dB_r = Σ_t G_t^T A_r X_t``, each through whichever
    per-token intermediate costs fewer multiply-adds (one GEMM over all tokens and terms, then a
    contraction over tokens).
    """
    (R, m1, n1), (_, m2, n2) = a.shape, b.shape
    xs = x.reshape(-1, n1, n2)
    gs = g.reshape(-1, m1, m2)
    T = xs.shape[0]
    ga = gb = None
    b_cost, a_cost = contraction_costs(m1, n1, m2, n2)
    if need_a:
        if b_first(m1, n1, m2, n2):
            q = (xs.reshape(T * n1, n2) @ b.reshape(R * m2, n2).T).reshape(T, n1, R, m2)  # (X_t B_r^T)[j1, i2]
            ga = torch.einsum("tim,tjrm->rij", gs, q)
        else:
            bf = b.permute(1, 0, 2).reshape(m2, R * n2)
            p = (gs.reshape(T * m1, m2) @ bf).reshape(T, m1, R, n2)  # (G_t B_r)[i1, j2]
            ga = torch.einsum("tirn,tjn->rij", p, xs)
    if need_b:
        if a_cost <= b_cost:
            xt = xs.transpose(1, 2).reshape(T * n2, n1)
            p = (xt @ a.reshape(R * m1, n1).T).reshape(T, n2, R, m1)  # (A_r X_t)[i1, j2]
            gb = torch.einsum("tim,tnri->rmn", gs, p)
        else:
            gt = gs.transpose(1, 2).reshape(T * m2, m1)
            q = (gt @ a.permute(1, 0, 2).reshape(m1, R * n1)).reshape(T, m2, R, n1)  # (G_t^T A_r)[i2, j1]
            gb = torch.einsum("tmrj,tjn->rmn", q, xs)
    return ga, gb


def bias_grad(g: Tensor) -> Tensor:
    return g.reshape(-1, g.shape[-1]).sum(0)


def _kron_setup(ctx: OpCtx, inputs: tuple, output: Tensor) -> None:
    x, a, b, _ = inputs
    ctx.save_for_backward(x, a, b)


def _kron_backward(ctx: OpCtx, g: Tensor) -> tuple[Tensor | None, ...]:
    x, a, b = ctx.saved_tensors
    need = needs_grad(ctx, 4)
    gx = torch.ops.kronc.kron_linear(g, a.transpose(1, 2), b.transpose(1, 2)) if need[0] else None
    ga, gb = kron_factor_grads(g, x, a, b, need[1], need[2])
    return gx, ga, gb, bias_grad(g) if need[3] else None


kron_linear.register_autograd(_kron_backward, setup_context=_kron_setup)


# ---- kron_embedding -------------------------------------------------------------------------


def kron_embedding_torch(index: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return kronecker_rows(index, a, b)


@kronc_op
def kron_embedding(index: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Rows ``index`` of ``Σ_r a[r] ⊗ b[r]``: shape ``(*index.shape, n1*n2)``; the table is never built."""
    check_kron_embedding("kron_embedding", index, a, b)
    if use_triton("kron_embedding", a):
        from ..triton.kron_embedding import kron_embedding as kernel

        return kernel(index, a, b)
    return kron_embedding_torch(index, a, b).contiguous()


@kron_embedding.register_fake
def _(index: Tensor, a: Tensor, b: Tensor) -> Tensor:
    _, width = check_kron_embedding("kron_embedding", index, a, b)
    return a.new_empty((*index.shape, width))


def _embedding_setup(ctx: OpCtx, inputs: tuple, output: Tensor) -> None:
    index, a, b = inputs
    ctx.save_for_backward(index, a, b)


def _embedding_backward(ctx: OpCtx, g: Tensor) -> tuple[Tensor | None, ...]:
    index, a, b = ctx.saved_tensors
    (_, _, n1), (_, m2, n2) = a.shape, b.shape
    flat = index.reshape(-1).long()
    i1, i2 = flat // m2, flat % m2
    gs = g.reshape(-1, n1, n2)
    ga = gb = None
    need = needs_grad(ctx, 3)
    if need[1]:
        part = torch.einsum("qjk,rqk->rqj", gs, b[:, i2])  # (R, Q, n1)
        ga = a.new_zeros(a.shape).index_add_(1, i1, part)
    if need[2]:
        part = torch.einsum("qjk,rqj->rqk", gs, a[:, i1])  # (R, Q, n2)
        gb = b.new_zeros(b.shape).index_add_(1, i2, part)
    return None, ga, gb


kron_embedding.register_autograd(_embedding_backward, setup_context=_embedding_setup)
