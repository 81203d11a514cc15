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

from collections.abc import Callable, Sequence

from torch import Tensor

from ..formats import Dense, DenseSpec, Factorized, FormatSpec
from ..values import encode_many
from .families import family
from .families.lowrank import whitened_lowrank

__all__ = ["fit_site", "fit_sites", "whitened_lowrank"]


def fit_site(weight: Tensor, spec: FormatSpec, moments: Tensor | None = None, damping: float = 0.01) -> Factorized:
    """Fit ``spec`` to a dense ``(out, in)`` weight, data-aware when input ``moments`` are given (its family's fit)."""
    return family(spec.kind).fit(weight, spec, moments, damping)


def fit_sites(items: Sequence[tuple[Tensor, FormatSpec, Tensor | None]], damping: float = 0.01,
              done: Callable[[int], None] | None = None) -> list[Factorized]:
    """`fit_site` of every ``(weight, spec, moments)``, the dense GPTQ ones together: their fits share one
    Gram matrix rotation and inverse per input and one column loop per shape (`kronc.values.encode_many`),
    with the same result as one `fit_site` each. ``done(i)``: called as item ``i`` is fitted."""
    gptq = [i for i, (_, spec, h) in enumerate(items) if isinstance(spec, DenseSpec) and h is not None
            and spec.precision is not None and not spec.precision.is_float and spec.precision.fit == "gptq"]
    out: dict[int, Factorized] = {}
    if gptq:
        encoded = encode_many([(items[i][0].detach().float(), items[i][1].precision, items[i][2]) for i in gptq])  # type: ignore[misc]
        for i, enc in zip(gptq, encoded, strict=True):
            w, spec, _ = items[i]
            out[i] = Dense(w, spec, encoded=enc)  # type: ignore[arg-type]
            if done:
                done(i)
    for i, (w, spec, h) in enumerate(items):
        if i not in out:
            out[i] = fit_site(w, spec, h, damping)
            if done:
                done(i)
    return [out[i] for i in range(len(items))]
