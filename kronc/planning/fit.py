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

from torch import Tensor

from ..formats import Factorized, FormatSpec
from .families import family
from .families.lowrank import whitened_lowrank

__all__ = ["fit_site", "whitened_lowrank"]


def fit_site(weight: Tensor, spec: FormatSpec, moments: Tensor | None = None, damping: float = 0.01) -> Factorized:
    """Fit ``spec`` to a dense ``(out, in)`` weight, data-aware when input ``moments`` are given (its family's fit)."""
    return family(spec.kind).fit(weight, spec, moments, damping)
