"""Low rank on the planning side: rank candidates, every rank's error from one spectrum, the
activation-aware (whitened) SVD fit."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ...formats import FormatSpec, LowRank, LowRankSpec, Shape
from ...formats.base import check_matrix
from ..estimate import F64, SiteAnalysis, eig_desc, tail_sums
from ..options import SearchOptions
from ..shapes import max_saving_rank
from ..whiten import damped, whitener
from .base import Choice, Family


class LowRankChoice(Choice):
    """Truncated SVD ``U @ V``."""

    kind: Literal["lowrank"] = "lowrank"
    """Format tag: ``lowrank``."""
    rank_min: int = Field(default=1, ge=1)
    """Smallest rank considered."""
    rank_max: int | None = Field(default=None, ge=1)
    """Largest rank considered (default: the largest rank that still saves bytes)."""
    rank_multiple: int = Field(default=8, ge=1)
    """Only ranks that are multiples of this (plus ``rank_min``) are considered; 8 suits GPU tiles."""

    @model_validator(mode="after")
    def _ordered(self) -> LowRankChoice:
        if self.rank_max is not None and self.rank_max < self.rank_min:
            raise ValueError(f"rank_max ({self.rank_max}) must be >= rank_min ({self.rank_min})")
        return self

    def describe(self) -> str:
        hi = "max" if self.rank_max is None else f"{self.rank_max:g}"
        return f"lowrank(rank {self.rank_min:g}-{hi}, x{self.rank_multiple})" + self.precision_note()


def lowrank_ranks(shape: Shape, choice: LowRankChoice) -> list[int]:
    """Ranks a low-rank choice allows on ``shape`` that save bytes."""
    cap = max_saving_rank(shape)
    if choice.rank_max is not None:
        cap = min(cap, choice.rank_max)
    step = choice.rank_multiple
    ranks = {choice.rank_min, *range(step * math.ceil(choice.rank_min / step), cap + 1, step)}
    return sorted(r for r in ranks if choice.rank_min <= r <= cap)


def lowrank_errors(an: SiteAnalysis, ranks: Sequence[int]) -> dict[int, float]:
    if an.folds is not None:
        tails = heldout_lowrank_tails(an)
        return {r: an.rel(tails[min(r, tails.numel() - 1)]) for r in ranks}
    lam, _ = an.spectrum(upto=max(ranks, default=0))
    tails = tail_sums(lam)
    return {r: an.rel(tails[min(r, lam.numel())]) for r in ranks}


def heldout_lowrank_tails(an: SiteAnalysis) -> Tensor:
    """``tails[r]``: squared output error of the whitened rank-``r`` fit, held out (see the class).

    The whitened fit to ``H_a`` is ``P_r W`` with ``P_r`` the projection on the top ``r``
    eigenvectors ``u_i`` of ``W H_a W^T``, so its error under ``H_b`` is
    ``tr(W H_b W^T) - sum_{i<r} u_i^T W H_b W^T u_i``. When ``out > in`` the ``u_i`` come from
    the ``in``-side decomposition of ``W S_a`` (``u_i ∝ W S_a v_i``).
    """
    assert an.folds is not None
    m, n = an.shape
    w = an.w
    halves = [an.shared.get(("damped", an.damping), f, partial(damped, f, an.damping)) for f in an.folds]
    out = torch.zeros(min(m, n) + 1, dtype=F64)
    for fit_h, eval_h in ((halves[0], halves[1]), (halves[1], halves[0])):
        if m <= n:
            lam, u = eig_desc((w @ fit_h) @ w.T, True)
            assert u is not None
            gain = ((u.T @ ((w @ eval_h) @ w.T)) * u.T).sum(1)
        else:
            ws = w @ an.shared.get("whitener", fit_h, partial(whitener, fit_h))
            lam, v = eig_desc(ws.T @ ws, True)
            assert v is not None
            z = w.T @ (ws @ v)  # columns: sigma_i W^T u_i
            live = lam > lam[0] * 1e-12 if lam.numel() and lam[0] > 0 else torch.zeros_like(lam, dtype=torch.bool)
            gain = torch.where(live, ((eval_h @ z) * z).sum(0) / torch.where(live, lam, 1.0), 0.0)
        held = float(((w @ eval_h) * w).sum())
        out += held - torch.cat([torch.zeros(1, dtype=F64), gain.cumsum(0)])[: out.numel()]
    return (out / 2).clamp_min(0)


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


class LowRankFamily(Family):
    kind = "lowrank"
    choice = LowRankChoice

    def structures(self, shape: Shape, choice: Choice, options: SearchOptions) -> Iterable[FormatSpec]:
        assert isinstance(choice, LowRankChoice)
        return [LowRankSpec(rank=r) for r in lowrank_ranks(shape, choice)]

    def errors(self, analysis: SiteAnalysis, specs: Sequence[FormatSpec]) -> list[float]:
        ranks = [s.rank for s in specs]  # type: ignore[attr-defined]
        found = lowrank_errors(analysis, sorted(set(ranks)))
        return [found[r] for r in ranks]

    def fit(self, weight: Tensor, spec: FormatSpec, moments: Tensor | None, damping: float) -> LowRank:
        assert isinstance(spec, LowRankSpec)
        return LowRank.fit(weight, spec) if moments is None else whitened_lowrank(weight, spec, moments, damping)

    def uniform(self, shape: Shape, itemsize: int, cap: float, options: SearchOptions) -> list[FormatSpec]:
        r = min(shape[0], shape[1], int(cap // (itemsize * (shape[0] + shape[1]))))
        return [LowRankSpec(rank=r)] if r >= 1 else []

