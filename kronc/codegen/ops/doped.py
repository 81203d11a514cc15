"""``kronc::doped_kron_linear``: a Kronecker sum plus a sparse overlay, ``x @ (Σ_r A_r ⊗ B_r + S).T``.

The torch implementation is the sum of the two parts (`kronecker_apply` then the overlay product
of `kronc::sparse_linear`, in the order `Doped.forward` always added them); the Triton kernel adds the overlay to the
Kronecker output tile before it is written, so the output makes one trip to memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...reference.kronecker import kronecker_apply
from ..backend import use_triton
from ..checks.common import OpCtx, needs_grad
from ..checks.doped import check_doped
from ._registry import kronc_op
from .kron import bias_grad, kron_factor_grads
from .sparse import overlay_product, sparse_input_grad, values_grad


def doped_kron_linear_torch(
    x: Tensor, a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, values: Tensor, bias: Tensor | None = None
) -> Tensor:
    y = kronecker_apply(x, a, b) + overlay_product(x, rows, cols, values, a.shape[1] * b.shape[1])
    return y if bias is None else y + bias


@kronc_op
def doped_kron_linear(
    x: Tensor, a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, values: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``x @ (Σ_r a[r] ⊗ b[r] + S).T + bias`` with ``S[rows[k], cols[k]] = values[k]`` (rows sorted)."""
    check_doped("doped_kron_linear", x, a, b, rows, cols, values, bias)
    if use_triton("doped_kron_linear", x):
        from ..triton.doped_kron import doped_kron_linear as kernel

        return kernel(x, a, b, rows, cols, values, bias)
    return doped_kron_linear_torch(x, a, b, rows, cols, values, bias).contiguous()


@doped_kron_linear.register_fake
def _(
    x: Tensor, a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, values: Tensor, bias: Tensor | None = None
) -> Tensor:
    out_features = check_doped("doped_kron_linear", x, a, b, rows, cols, values, bias)
    return x.new_empty((*x.shape[:-1], out_features))


def _setup(ctx: OpCtx, inputs: tuple, output: Tensor) -> None:
    x, a, b, rows, cols, values, _ = inputs
    ctx.save_for_backward(x, a, b, rows, cols, values)


def _backward(ctx: OpCtx, g: Tensor) -> tuple[Tensor | None, ...]:
    x, a, b, rows, cols, values = ctx.saved_tensors
    need = needs_grad(ctx, 7)
    gx = None
    if need[0]:
        out_features, in_features = g.shape[-1], x.shape[-1]
        gx = torch.ops.kronc.kron_linear(g, a.transpose(1, 2), b.transpose(1, 2))
        gx = gx + sparse_input_grad(g, rows, cols, values, out_features, in_features)
    ga, gb = kron_factor_grads(g, x, a, b, need[1], need[2])
    gv = values_grad(g, x, rows, cols) if need[5] else None
    return gx, ga, gb, None, None, gv, bias_grad(g) if need[6] else None


doped_kron_linear.register_autograd(_backward, setup_context=_setup)
