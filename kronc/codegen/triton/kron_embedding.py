"""Triton kernel for ``kronc::kron_embedding``: rows of ``W = Σ_r A_r ⊗ B_r`` built on the fly.

Row ``i`` of ``W`` is ``Σ_r A_r[i // m2] ⊗ B_r[i % m2]``: each program owns a block of looked-up
indices and a block of the row's ``n1*n2`` columns and sums the outer products of the two factor
rows over the terms. The table itself is never formed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks.kron import check_kron_embedding
from ._common import autotuned as _autotuned
from ._common import check_device, is_interpreted, launcher


@triton.jit
def _kron_embedding_kernel(
    idx_ptr, a_ptr, b_ptr, out_ptr,
    Q, R, M2, N1, N2,
    stride_ar, stride_ai, stride_aj, stride_br, stride_bi, stride_bj,
    BQ: tl.constexpr, BN: tl.constexpr,
):
    offs_q = tl.program_id(0) * BQ + tl.arange(0, BQ)
    offs_c = tl.program_id(1) * BN + tl.arange(0, BN)
    q_ok = offs_q < Q
    c_ok = offs_c < N1 * N2
    idx = tl.load(idx_ptr + offs_q, mask=q_ok, other=0)
    i1, i2 = idx // M2, idx % M2
    j1, j2 = offs_c // N2, offs_c % N2
    mask = q_ok[:, None] & c_ok[None, :]
    acc = tl.zeros((BQ, BN), dtype=tl.float32)
    for r in range(0, R):
        av = tl.load(a_ptr + r * stride_ar + i1[:, None] * stride_ai + j1[None, :] * stride_aj, mask=mask, other=0.0)
        bv = tl.load(b_ptr + r * stride_br + i2[:, None] * stride_bi + j2[None, :] * stride_bj, mask=mask, other=0.0)
        acc += av.to(tl.float32) * bv.to(tl.float32)
    tl.store(out_ptr + offs_q[:, None] * (N1 * N2) + offs_c[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


CONFIGS = [
    triton.Config({"BQ": bq, "BN": bn}, num_warps=w)
    for bq, bn, w in [(1, 256, 4), (4, 128, 4), (16, 64, 4), (16, 128, 8), (32, 64, 8)]
]
INTERPRETER_META = {"BQ": 8, "BN": 32}
_tuned = _autotuned(_kron_embedding_kernel, CONFIGS, key=["R", "M2", "N1", "N2"])


def kron_embedding(index: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Rows ``index`` of ``Σ_r a[r] ⊗ b[r]`` by the Triton kernel: shape ``(*index.shape, n1*n2)``."""
    check_kron_embedding("kron_embedding", index, a, b)
    check_device("kron_embedding", _kron_embedding_kernel, a)
    (R, _, n1), (_, m2, n2) = a.shape, b.shape
    flat = index.reshape(-1).contiguous()
    Q = flat.numel()
    out = torch.empty(Q, n1 * n2, dtype=a.dtype, device=a.device)
    if Q and n1 * n2:
        interp = is_interpreted(_kron_embedding_kernel)
        meta = dict(INTERPRETER_META) if interp else {}

        def grid(m: dict) -> tuple[int, int]:
            return triton.cdiv(Q, m["BQ"]), triton.cdiv(n1 * n2, m["BN"])

        launcher(_kron_embedding_kernel if interp else _tuned)[grid](
            flat, a, b, out, Q, R, m2, n1, n2, *a.stride(), *b.stride(), **meta
        )
    return out.reshape(*index.shape, n1 * n2)
