"""Fitting a planned spec to a site's weight, data-aware where the planner measured it that way.

`fit_site` is what a rewrite should call for a plan whose ``objective`` is ``"data"``: the error
estimates in such a plan describe these fits.

* ``lowrank`` with moments: activation-aware SVD (SVD-LLM style). With ``S`` the Cholesky factor of
  the damped input moments (`whiten`), the truncated SVD ``U_r Σ_r V_r^T`` of ``W S`` gives
  ``U = U_r Σ_r^{1/2}`` and ``V = Σ_r^{1/2} V_r^T S^{-1}``. Then ``(W - U V) S`` is the SVD tail of
  ``W S``, so the fit is optimal for the data-aware error and its error is exactly the tail.
* ``doped`` and ``blocksparse`` with moments: the weight-space base, then entries (blocks) ranked by
  ``|residual_ij| * sqrt(H_jj)`` (Wanda's score, the diagonal of the data-aware error) instead of
  by magnitude.
* every other format (and every format without moments): the weight-space fit of
  `kronc.formats.fit` (Van Loan–Pitsianis, magnitude doping, block norms). The planner's
  data-aware estimate for all of these is the exact data-aware error of the fit described here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..formats import (
    BlockSparse,
    BlockSparseSpec,
    Doped,
    DopedSpec,
    Factorized,
    FormatSpec,
    LowRank,
    LowRankSpec,
    fit,
)
from ..formats.base import check_matrix
from .whiten import column_scale, damped, whitener


def fit_site(weight: Tensor, spec: FormatSpec, moments: Tensor | None = None, damping: float = 0.01) -> Factorized:
    """Fit ``spec`` to a dense ``(out, in)`` weight, data-aware when input ``moments`` are given."""
    if moments is None:
        return fit(weight, spec)
    if isinstance(spec, LowRankSpec):
        return whitened_lowrank(weight, spec, moments, damping)
    if isinstance(spec, DopedSpec):
        return Doped.fit(weight, spec, column_scale=column_scale(damped(moments, damping)))
    if isinstance(spec, BlockSparseSpec):
        return BlockSparse.fit(weight, spec, column_scale=column_scale(damped(moments, damping)))
    return fit(weight, spec)


def whitened_lowrank(weight: Tensor, spec: LowRankSpec, moments: Tensor, damping: float = 0.01) -> LowRank:
    """Low-rank factors minimising ``||(W - U V) S||_F`` for ``S S^T = H + damping``.

    The minimiser is ``P_r W`` with ``P_r`` the projection on the top ``r`` left singular vectors
    ``u_i`` of ``W S`` (the eigenvectors of ``W H W^T``); stored balanced, ``U = U_r Σ_r^{1/2}`` and
    ``V = Σ_r^{-1/2} U_r^T W``. The vectors come from the smaller side: ``W H W^T`` when
    ``out <= in``, else the eigenvectors ``v_i`` of ``S^T W^T W S`` with ``u_i = W S v_i / σ_i``.
    """
    check_matrix(weight)
    spec.check(tuple(weight.shape))  # type: ignore[arg-type]
    if moments.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"moments of shape {tuple(moments.shape)} do not match a weight with {weight.shape[1]} inputs")
    h = damped(moments, damping)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    m, n = w.shape
    r = spec.rank
    if m <= n:
        lam, vec = torch.linalg.eigh((w @ h) @ w.T)
        lam, u = lam.flip(0)[:r].clamp_min(0), vec.flip(1)[:, :r]
    else:
        ws = w @ whitener(h)
        lam, vec = torch.linalg.eigh(ws.T @ ws)
        lam, v = lam.flip(0)[:r].clamp_min(0), vec.flip(1)[:, :r]
        live = lam > lam[0] * 1e-12 if lam[0] > 0 else torch.zeros_like(lam, dtype=torch.bool)
        u = (ws @ v) / torch.where(live, lam, torch.ones_like(lam)).sqrt() * live
    root = lam.sqrt().sqrt()  # Σ^{1/2}
    live = root > 0
    left = u * root
    right = (u.T @ w) / torch.where(live, root, torch.ones_like(root))[:, None] * live[:, None]
    dev = weight.device
    return LowRank(left.to(dev, weight.dtype), right.to(dev, weight.dtype), spec)
