"""Joint fit of a quantized base plus a low-rank correction of its error (LQER / CALDERA style).

``W ≈ Q + L R``: alternate ``Q = quantize(W - L R)`` (by the precision's fit; GPTQ uses ``H``) and
``L R = best rank-r approximation of W - Q``. With the Gram matrix ``H = X^T X`` the low-rank step
is whitened (``||E X||`` is ``||E S||`` for ``H = S S^T``), so the correction spends its rank where the
inputs are. The first iterate is LQER (quantize, then correct the error); later ones are CALDERA's
alternation. The iterate with the smallest error is returned, so the result is never worse than LQER.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .codec import Encoded, decode, encode
from .precision import Precision, PrecisionError


@dataclass(frozen=True)
class JointFit:
    """``base`` (the quantized part, an `Encoded`), ``left`` ``(rows, r)`` and ``right`` ``(r, in)`` float32
    factors, and the relative error ``||(W - Q - L R) S|| / ||W S||`` after each iteration."""

    base: Encoded
    left: Tensor
    right: Tensor
    errors: list[float] = field(default_factory=list)

    def to_dense(self) -> Tensor:
        """``Q + L R`` in the original shape (float32)."""
        q = decode(self.base)
        return q + (self.left @ self.right).reshape(q.shape)


def _whitener(h: Tensor | None, inn: int, damp: float) -> Tensor | None:
    if h is None:
        return None
    if tuple(h.shape) != (inn, inn):
        raise PrecisionError(f"fit_joint: H must be ({inn}, {inn}) for last dimension {inn}, got {tuple(h.shape)}")
    h = h.double()
    reg = damp * torch.diag(h).mean().clamp_min(1e-12) * torch.eye(inn, dtype=h.dtype, device=h.device)
    return torch.linalg.cholesky(h + reg)


def _best_rank(r_: Tensor, rank: int, s: Tensor | None) -> tuple[Tensor, Tensor]:
    """``L, R`` minimising ``||(r_ - L R) S||`` (``S`` = identity when None)."""
    target = r_ if s is None else r_ @ s
    u, sv, vh = torch.linalg.svd(target, full_matrices=False)
    left, right = u[:, :rank] * sv[:rank], vh[:rank]
    if s is not None:  # R S = V_r  =>  R = V_r S^{-1}
        right = torch.linalg.solve_triangular(s, right, upper=False, left=False)
    return left, right


def fit_joint(w: Tensor, p: Precision, rank: int, h: Tensor | None = None, iters: int = 8,
              damp: float = 0.01) -> JointFit:
    """``w`` (shape ``(..., in)``) as a ``p``-quantized base plus a rank-``rank`` float correction."""
    rows, inn = p.check_shape(tuple(w.shape))
    if not 0 <= rank <= min(rows, inn):
        raise PrecisionError(f"fit_joint: rank must lie in [0, {min(rows, inn)}] for shape {tuple(w.shape)}, got {rank}")
    W = w.detach().reshape(rows, inn).double()
    s = _whitener(h, inn, damp)
    norm = float((W if s is None else W @ s).norm()) or 1.0
    lr = torch.zeros_like(W)
    errors: list[float] = []
    best: tuple[float, Encoded, Tensor, Tensor] | None = None
    for _ in range(max(1, iters)):
        base = encode((W - lr).float(), p, h)
        q = decode(base).reshape(rows, inn).double()
        left, right = _best_rank(W - q, rank, s)
        lr = left @ right
        e = W - q - lr
        err = float((e if s is None else e @ s).norm()) / norm
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, Encoded(p, tuple(w.shape), base.codes, base.scales, base.minima), left, right)
    assert best is not None
    return JointFit(best[1], best[2].float(), best[3].float(), errors)
