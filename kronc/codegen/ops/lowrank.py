"""``kronc::lowrank_linear``: ``x @ (U V).T + bias`` through the rank-``r`` intermediate ``x V^T``.

``u`` is ``(out, r)``, ``v`` is ``(r, in)``. The torch implementation is the format's reference
(`lowrank_apply`, two thin matmuls); the Triton kernel keeps the ``(tokens, r)`` intermediate on chip.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...reference.lowrank import lowrank_apply
from ..backend import kernel_mode, use_triton
from ..checks.common import OpCtx, needs_grad
from ..checks.lowrank import check_lowrank
from ._registry import kronc_op


def lowrank_linear_torch(x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    y = lowrank_apply(x, u, v)
    return y if bias is None else y + bias


@kronc_op
def lowrank_linear(x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ (u @ v).T + bias`` for ``x`` of shape ``(..., in)``; ``u @ v`` is never built."""
    check_lowrank("lowrank_linear", x, u, v, bias)
    if use_triton("lowrank_linear", x):
        from ..triton import lowrank as kernels

        # ranks above the kernel's on-chip limit take the torch path unless Triton is forced
        if u.shape[1] <= kernels.MAX_RANK or kernel_mode() == "triton":
            return kernels.lowrank_linear(x, u, v, bias)
    return lowrank_linear_torch(x, u, v, bias).contiguous()


@lowrank_linear.register_fake
def _(x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    out_features = check_lowrank("lowrank_linear", x, u, v, bias)
    return x.new_empty((*x.shape[:-1], out_features))


def _setup(ctx: OpCtx, inputs: tuple, output: Tensor) -> None:
    x, u, v, _ = inputs
    ctx.save_for_backward(x, u, v)


def _backward(ctx: OpCtx, g: Tensor) -> tuple[Tensor | None, ...]:
    x, u, v = ctx.saved_tensors
    need = needs_grad(ctx, 4)
    gx = torch.ops.kronc.lowrank_linear(g, v.T, u.T) if need[0] else None
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    gu = g2.T @ (x2 @ v.T) if need[1] else None  # (out, r)
    gv = (g2 @ u).T @ x2 if need[2] else None  # (r, in)
    gb = g2.sum(0) if need[3] else None
    return gx, gu, gv, gb


lowrank_linear.register_autograd(_backward, setup_context=_setup)
