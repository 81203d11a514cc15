"""Pieces shared by the kronc Triton kernels: the matmul step, the sparse-overlay tile, launch helpers.

Kernels accumulate in float32 and write the output in the input dtype. Under the Triton
interpreter (``TRITON_INTERPRET=1`` when these modules are imported) every kernel runs one small
fixed configuration, so tests on CPU stay fast; on CUDA the kernels are autotuned.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks.common import KernelUnavailable

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
"""Whether the kernels in this package were built for the interpreter (decided at import)."""


def is_interpreted(kernel: object) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported triton has the interpreter
        return False
    return isinstance(kernel, InterpretedFunction)


def check_device(op: str, kernel: object, x: Tensor) -> None:
    """The kernel can run on ``x``'s device (CPU tensors need the interpreter)."""
    if x.device.type == "cpu" and not is_interpreted(kernel):
        raise KernelUnavailable(
            f"kronc::{op}: the Triton kernel got CPU tensors but was not built for the interpreter; set "
            "TRITON_INTERPRET=1 before kronc.codegen.triton is first imported"
        )
    if x.device.type not in ("cpu", "cuda"):
        raise KernelUnavailable(f"kronc::{op}: the Triton kernels run on CUDA tensors, not {x.device.type}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelUnavailable(f"kronc::{op}: the Triton kernels take float32, float16 or bfloat16, not {x.dtype}")


def launcher(kernel: Any) -> Any:
    """``kernel`` wrapped so ``torch.compile``/``make_fx`` can trace its launch (a no-op in eager)."""
    return torch.library.wrap_triton(kernel)


def autotuned(kernel: Any, configs: list[triton.Config], key: list[str]) -> Any:
    """``kernel`` under ``triton.autotune`` on CUDA; the bare kernel under the interpreter."""
    if is_interpreted(kernel):
        return kernel
    return triton.autotune(configs=configs, key=key)(kernel)


def precision() -> str:
    """``tl.dot`` precision for float32 inputs, following torch's float32 matmul setting."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def upcast(kernel: object, dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands are upcast to float32 (the interpreter's bfloat16 dot is wrong)."""
    return is_interpreted(kernel) and dtype == torch.bfloat16


def next_pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(1, n)))
    return p if hi is None else min(p, hi)


def token_bucket(t: int) -> int:
    """Autotune key for the token count: the next power of two, capped (decode and prefill tune apart)."""
    return min(triton.next_power_of_2(max(1, t)), 4096)


def flat_tokens(x: Tensor, in_features: int) -> Tensor:
    """``x`` as a ``(tokens, in)`` matrix with unit feature stride (a copy only when needed)."""
    x2 = x.reshape(-1, in_features)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def csr_pointers(rows: Tensor, n_rows: int) -> Tensor:
    """Compressed row pointers (``n_rows + 1``, int32) of sorted entry rows; static output shape."""
    bounds = torch.arange(n_rows + 1, device=rows.device, dtype=rows.dtype)
    return torch.searchsorted(rows, bounds, out_int32=True)


@triton.jit
def mm(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` (2-D or batched 3-D), float32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def csr_overlay(acc, x_ptr, stride_xt, tok, tok_mask, o, o_mask, crow_ptr, col_ptr, val_ptr):
    """``acc[t, o] += Σ_k values[k] * x[t, cols[k]]`` over the compressed row of each output ``o``.

    ``tok``/``tok_mask`` broadcast along the token axis of ``acc`` and ``o``/``o_mask`` along its
    output axes; the loop runs to the longest row in the tile (shorter rows are masked).
    """
    start = tl.load(crow_ptr + o, mask=o_mask, other=0)
    end = tl.load(crow_ptr + o + 1, mask=o_mask, other=0)
    longest = tl.max(end - start)
    for k in range(0, longest):
        e = start + k
        live = o_mask & (e < end)
        c = tl.load(col_ptr + e, mask=live, other=0)
        v = tl.load(val_ptr + e, mask=live, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + tok * stride_xt + c, mask=live & tok_mask, other=0.0).to(tl.float32)
        acc += xv * v
    return acc


@triton.jit
def kron_tile(
    x_ptr, p_ptr, q_ptr,
    offs_t, offs_p1, offs_p2,
    T, R, P1, P2, Q1, Q2,
    stride_xt, stride_xq1, stride_xq2,
    stride_pr, stride_pp1, stride_pq1,
    stride_qr, stride_qp2, stride_qq2,
    BT: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr, BQ1: tl.constexpr, BQ2: tl.constexpr,
    CHUNKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``acc[t, p1, p2] = Σ_r Σ_q1 P[r, p1, q1] (Σ_q2 X[t, q1, q2] Q[r, p2, q2])`` for one output tile.

    The inner contraction (over ``q2``) gives ``Z = X Q_r^T``, which stays on chip and feeds the
    outer one (over ``q1``) directly. ``CHUNKED`` contracts ``q1`` in chunks of ``BQ1`` with a
    batched ``tl.dot`` (needs ``BQ1 >= 16``: large factors); otherwise ``q1`` runs one at a time with
    ``Z``'s row for that ``q1`` folded in as an outer product (small factors, no padding waste).
    """
    acc = tl.zeros((BT, BP1, BP2), dtype=tl.float32)
    p1_ok = offs_p1 < P1
    p2_ok = offs_p2 < P2
    t_ok = offs_t < T
    kq2 = tl.arange(0, BQ2)
    if CHUNKED:
        flat = tl.arange(0, BT * BQ1)
        tok = tl.program_id(0) * BT + flat // BQ1
        sub = flat % BQ1
        for r in range(0, R):
            for q1_0 in range(0, Q1, BQ1):
                q1 = q1_0 + sub
                row_ok = (tok < T) & (q1 < Q1)
                z = tl.zeros((BT * BQ1, BP2), dtype=tl.float32)
                for q2_0 in range(0, Q2, BQ2):
                    q2 = q2_0 + kq2
                    q2_ok = q2 < Q2
                    xv = tl.load(
                        x_ptr + tok[:, None] * stride_xt + q1[:, None] * stride_xq1 + q2[None, :] * stride_xq2,
                        mask=row_ok[:, None] & q2_ok[None, :], other=0.0,
                    )
                    qv = tl.load(
                        q_ptr + r * stride_qr + offs_p2[None, :] * stride_qp2 + q2[:, None] * stride_qq2,
                        mask=q2_ok[:, None] & p2_ok[None, :], other=0.0,
                    )
                    z = mm(xv, qv, z, PRECISION, UPCAST)
                z3 = tl.reshape(z, (BT, BQ1, BP2)).to(x_ptr.dtype.element_ty)
                pq1 = q1_0 + tl.arange(0, BQ1)
                pv = tl.load(
                    p_ptr + r * stride_pr + offs_p1[:, None] * stride_pp1 + pq1[None, :] * stride_pq1,
                    mask=p1_ok[:, None] & (pq1 < Q1)[None, :], other=0.0,
                )
                p3 = tl.broadcast_to(pv[None, :, :], (BT, BP1, BQ1))
                acc = mm(p3, z3, acc, PRECISION, UPCAST)
    else:
        for r in range(0, R):
            for q1 in range(0, Q1):
                z = tl.zeros((BT, BP2), dtype=tl.float32)
                for q2_0 in range(0, Q2, BQ2):
                    q2 = q2_0 + kq2
                    q2_ok = q2 < Q2
                    xv = tl.load(
                        x_ptr + offs_t[:, None] * stride_xt + q1 * stride_xq1 + q2[None, :] * stride_xq2,
                        mask=t_ok[:, None] & q2_ok[None, :], other=0.0,
                    )
                    qv = tl.load(
                        q_ptr + r * stride_qr + offs_p2[None, :] * stride_qp2 + q2[:, None] * stride_qq2,
                        mask=q2_ok[:, None] & p2_ok[None, :], other=0.0,
                    )
                    z = mm(xv, qv, z, PRECISION, UPCAST)
                z = z.to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference rounds Z to the input dtype too
                pv = tl.load(p_ptr + r * stride_pr + offs_p1 * stride_pp1 + q1 * stride_pq1, mask=p1_ok, other=0.0)
                acc += pv.to(tl.float32)[None, :, None] * z[:, None, :]
    return acc
