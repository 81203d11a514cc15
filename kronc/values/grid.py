"""The integer grid of a `Precision`: level ranges, per-group scale/minimum, rounding and decoding.

Values are handled as a ``(rows, groups, group)`` view of the tensor (``group = in`` for per-row
scales). Scales and minima are rounded to fp16 *before* the levels are computed, so decoding the
stored values gives exactly what the fit measured, and a tensor already on the grid comes back exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .precision import Precision


def level_range(p: Precision) -> tuple[int, int]:
    """Inclusive range of the stored level ``q`` (symmetric: ``±(2^(b-1)-1)``; asymmetric: ``0..2^b-1``)."""
    if p.symmetric:
        half = 2 ** (p.bits - 1) - 1
        return -half, half
    return 0, 2**p.bits - 1


def grouped(w: Tensor, p: Precision) -> Tensor:
    """``w`` (any shape ``(..., in)``) as float32 ``(rows, groups, group)``."""
    rows, inn = p.check_shape(tuple(w.shape))
    g = p.group_size or inn
    return w.reshape(rows, inn // g, g).float()


def to_fp16(t: Tensor) -> Tensor:
    """Round to fp16 (saturating at fp16's largest finite value) and back to float32."""
    return t.clamp(-65504.0, 65504.0).half().float()


def minmax_params(wg: Tensor, p: Precision, shrink: Tensor | float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Scale (and minimum) per group of ``wg`` ``(..., group)`` from its range times ``shrink`` (clipping).

    Returns fp16-representable float32 tensors of shape ``wg.shape[:-1]``.
    """
    lo, hi = level_range(p)
    if p.symmetric:
        return to_fp16(wg.abs().amax(-1) * shrink / hi), None
    wmin, wmax = wg.amin(-1) * shrink, wg.amax(-1) * shrink
    mn = to_fp16(wmin)
    return to_fp16((wmax - mn).clamp_min(0) / hi), mn


def levels(wg: Tensor, scale: Tensor, minimum: Tensor | None, p: Precision) -> Tensor:
    """Nearest grid levels (int32) of ``wg`` ``(..., group)`` for per-group ``scale``/``minimum`` ``(...)``."""
    lo, hi = level_range(p)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)[..., None]
    shifted = wg if minimum is None else wg - minimum[..., None]
    return torch.round(shifted / safe).clamp_(lo, hi).to(torch.int32)


def values(q: Tensor, scale: Tensor, minimum: Tensor | None) -> Tensor:
    """Float32 values of levels ``q`` ``(..., group)``: ``q * scale (+ minimum)``."""
    w = q.float() * scale.float()[..., None]
    return w if minimum is None else w + minimum.float()[..., None]


@dataclass(frozen=True)
class Levels:
    """Grid levels ``q`` ``(rows, groups, group)`` with per-group ``scale`` (and ``minimum``), float32
    tensors of fp16-representable values, shape ``(rows, groups)``: what every fit returns."""

    q: Tensor
    scale: Tensor
    minimum: Tensor | None

    def values(self) -> Tensor:
        """Decoded float32 values ``(rows, groups, group)``."""
        return values(self.q, self.scale, self.minimum)
