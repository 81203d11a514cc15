"""How the integer values of a tensor are chosen: round to nearest, data-free (clip search + HQQ), GPTQ.

Every fit returns `Levels` on the same grid (`grid.py`), so the codec packs them the same way. Each
fit keeps an exact-structure input exact: a tensor already on the grid is fitted with zero error
(RTN reproduces it; the data-free search includes the unclipped range and keeps the best per group;
GPTQ's first column has zero error, so nothing is propagated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .grid import grouped, level_range, levels, minmax_params, to_fp16, values
from .precision import Precision, PrecisionError

CLIP_RATIOS = tuple(1.0 - 0.04 * i for i in range(13))  # 1.0 .. 0.52
"""Range shrink factors tried per group by the data-free fit."""

GPTQ_DAMPING = 0.1
"""GPTQ's damping, a share of the mean diagonal of ``H`` added to it. 10% rather than GPTQ's 1%: with a
few thousand calibration tokens, 1% fits them too closely and transfers worse to other text (SmolLM2,
King James calibration, ABC news evaluation: every int4/int3 configuration of
``benchmarks/results/quality_quant.md`` is better at 10%)."""


@dataclass(frozen=True)
class Levels:
    """Grid levels ``q`` ``(rows, groups, group)`` with per-group ``scale`` (and ``minimum``), float32
    tensors of fp16-representable values, shape ``(rows, groups)``."""

    q: Tensor
    scale: Tensor
    minimum: Tensor | None

    def values(self) -> Tensor:
        """Decoded float32 values ``(rows, groups, group)``."""
        return values(self.q, self.scale, self.minimum)


def fit_rtn(w: Tensor, p: Precision) -> Levels:
    """Round to nearest on the full per-group range (absmax when symmetric, min..max otherwise)."""
    wg = grouped(w, p)
    scale, minimum = minmax_params(wg, p)
    return Levels(levels(wg, scale, minimum, p), scale, minimum)


def _group_err(wg: Tensor, lv: Levels) -> Tensor:
    return (wg - lv.values()).square().sum(-1)


def _quant_err(wg: Tensor, scale: Tensor, minimum: Tensor | None, p: Precision) -> Tensor:
    """Squared error per element of rounding ``wg`` to the grid of ``scale``/``minimum`` (no levels kept)."""
    lo, hi = level_range(p)
    s = torch.where(scale == 0, torch.ones_like(scale), scale)[..., None]
    shifted = wg if minimum is None else wg - minimum[..., None]
    v = torch.round(shifted / s).clamp_(lo, hi).mul_(scale[..., None])  # decoded as `values` does
    if minimum is not None:
        v.add_(minimum[..., None])
    return v.sub_(wg).square_()


def fit_clip(w: Tensor, p: Precision, ratios: tuple[float, ...] = CLIP_RATIOS) -> Levels:
    """Data-free: per group, the clipping of the range (``ratios`` of it) with the least squared error.

    One pass per ratio computes only each group's error (the best scale and minimum so far are kept,
    ties keep the earlier ratio); the levels are rounded once, at the end."""
    wg = grouped(w, p)
    scale, minimum = minmax_params(wg, p)
    best = _quant_err(wg, scale, minimum, p).sum(-1)
    for r in ratios:
        if r == 1.0:
            continue
        sc, mn = minmax_params(wg, p, shrink=r)
        err = _quant_err(wg, sc, mn, p).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, sc, scale)
        if minimum is not None and mn is not None:
            minimum = torch.where(better, mn, minimum)
    return Levels(levels(wg, scale, minimum, p), scale, minimum)


def clip_search_residual(w: Tensor, p: Precision, ratios: tuple[float, ...] = CLIP_RATIOS) -> Tensor:
    """``fit_clip(w, p).values() - w`` as float32 ``(rows, in)``, all ratios at once (no levels kept): the
    planner's cheap estimate of a data-free fit on a few rows (`fit_hqq` only improves on it).
    Each group takes the ratio with the least squared error, the first of equals, as the fit does."""
    wg = grouped(w, p)
    shrink = torch.tensor(ratios, dtype=wg.dtype).reshape(-1, *([1] * (wg.dim() - 1)))
    scale, minimum = minmax_params(wg[None], p, shrink=shrink)
    lo, hi = level_range(p)
    s = torch.where(scale == 0, torch.ones_like(scale), scale)[..., None]
    shifted = wg[None] if minimum is None else wg[None] - minimum[..., None]
    v = torch.round(shifted / s).clamp_(lo, hi).mul_(scale[..., None])
    if minimum is not None:
        v.add_(minimum[..., None])
    resid = v.sub_(wg[None])  # (ratios, rows, groups, group)
    pick = resid.square().sum(-1).argmin(0)[None, ..., None].expand(1, *resid.shape[1:])
    return resid.gather(0, pick)[0].reshape(wg.shape[0], -1)


def _shrink_lp(x: Tensor, beta: float, lp: float) -> Tensor:
    """HQQ's generalized soft threshold (proximal operator of ``|x|^lp``)."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(lp - 1) / beta)


def fit_hqq(w: Tensor, p: Precision, iters: int = 10, lp: float = 0.7, beta: float = 10.0,
            kappa: float = 1.01) -> Levels:
    """Data-free: `fit_clip`, then (asymmetric only) HQQ's half-quadratic fit of the zero point with
    the scale fixed, keeping per group whichever of the two has the smaller squared error.

    10 iterations: on 1536x576 weights at int4/int3 with groups of 64 they reach all but 0.05% of the
    error reduction that 20 reach, in half the time (the fit of every asymmetric site in `kronc.compile`)."""
    wg = grouped(w, p)
    best = fit_clip(w, p)
    if p.symmetric or best.minimum is None:  # symmetric grids have no minimum
        return best
    assert best.minimum is not None
    lo, hi = level_range(p)
    s = torch.where(best.scale == 0, torch.ones_like(best.scale), best.scale)[..., None]
    z = -best.minimum[..., None] / s  # w = (u - z) * s
    minimum = best.minimum
    best_err = _group_err(wg, best)
    for _ in range(iters):
        u = torch.round(wg / s + z).clamp(lo, hi)
        e = _shrink_lp(wg - (u - z) * s, beta, lp)
        z = (u - (wg - e) / s).mean(-1, keepdim=True)
        beta *= kappa
        mn = to_fp16(-z[..., 0] * s[..., 0])
        err = _quant_err(wg, best.scale, mn, p).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        minimum = torch.where(better, mn, minimum)
    return Levels(levels(wg, best.scale, minimum, p), best.scale, minimum)


def gptq_hinv(h: Tensor, damp: float = GPTQ_DAMPING) -> Tensor:
    """The upper Cholesky factor of the inverse of ``h`` damped by ``damp`` times its mean diagonal (dead
    inputs set to 1), float64: what `fit_gptq` propagates errors with (one per ``h``, shared by precisions)."""
    H = h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def fit_gptq(w: Tensor, p: Precision, h: Tensor, damp: float = GPTQ_DAMPING, block: int = 128,
             hinv: Tensor | None = None) -> Levels:
    """GPTQ: quantize column by column, spreading each column's error over the columns not yet
    quantized through the Cholesky factor of the damped inverse Gram matrix ``h = X^T X`` ``(in, in)``;
    lazy updates per block of columns; group scales are computed from the updated columns as each
    group is reached (blocks are whole groups, so those columns are current). ``hinv``: `gptq_hinv`
    of ``h`` at ``damp`` when already computed."""
    rows, inn = p.check_shape(tuple(w.shape))
    if tuple(h.shape) != (inn, inn):
        raise PrecisionError(f"fit='gptq': H must be ({inn}, {inn}) for last dimension {inn}, got {tuple(h.shape)}")
    g = p.group_size or inn
    block = g * max(1, block // g) if p.group_size else block
    W = w.reshape(rows, inn).double().clone()
    hinv = gptq_hinv(h, damp) if hinv is None else hinv
    q = torch.zeros(rows, inn, dtype=torch.int32, device=w.device)
    n_groups = inn // g
    scale = torch.zeros(rows, n_groups, device=w.device)
    minimum = None if p.symmetric else torch.zeros(rows, n_groups, device=w.device)
    if p.group_size is None:
        scale[:, 0], mn = minmax_params(W.float(), p)
        if minimum is not None and mn is not None:
            minimum[:, 0] = mn
    for i1 in range(0, inn, block):
        i2 = min(i1 + block, inn)
        W1, err1, h1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=W.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c, k = i1 + i, (i1 + i) // g
            if p.group_size is not None and c % g == 0:
                scale[:, k], mn = minmax_params(W1[:, i:i + g].float(), p)
                if minimum is not None and mn is not None:
                    minimum[:, k] = mn
            mn_k = None if minimum is None else minimum[:, k]
            qc = levels(W1[:, i:i + 1].float(), scale[:, k], mn_k, p)
            q[:, c] = qc[:, 0]
            err = (W1[:, i] - values(qc, scale[:, k], mn_k)[:, 0].double()) / h1[i, i]
            W1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return Levels(q.reshape(rows, n_groups, g), scale, minimum)


def fit_levels(w: Tensor, p: Precision, h: Tensor | None = None) -> Levels:
    """The levels of ``w`` by ``p.fit`` (``h``, the Gram matrix of the inputs, is required for gptq)."""
    if p.is_float:
        raise PrecisionError(f"precision {p.describe()} is a float cast; it has no integer levels to fit")
    if p.fit == "rtn":
        return fit_rtn(w, p)
    if p.fit == "hqq":
        return fit_hqq(w, p)
    if h is None:
        raise PrecisionError(f"precision {p.describe()}: fit='gptq' needs the calibration Gram matrix H = X^T X")
    return fit_gptq(w, p, h)


def gptq_residuals(w: Tensor, members: list[tuple[Precision, Tensor]], block: int = 128) -> Tensor:
    """``fit_gptq(w, p, hinv=hinv).values() - w`` for every ``(p, hinv)`` member at once, float64
    ``(members, rows, in)``: one column loop for all of them instead of one per member (the loop's
    per-column Python work, not its arithmetic, is what GPTQ costs on the few rows the planner samples).

    Members share ``w`` and the bit width and symmetry of their precisions; group sizes and ``hinv``
    (a `gptq_hinv`, e.g. one per calibration fold) may differ. Same steps as `fit_gptq` per member,
    batched, so equal to it up to the summation order of the block updates."""
    if not members:
        return torch.zeros(0, *w.shape, dtype=torch.float64)
    p0 = members[0][0]
    if any(p.dtype != p0.dtype or p.symmetric != p0.symmetric or p.is_float for p, _ in members):
        raise PrecisionError("gptq_residuals: members must share one integer dtype and symmetry")
    rows, inn = p0.check_shape(tuple(w.shape))
    for p, _ in members:
        p.check_shape(tuple(w.shape))
    gs = [p.group_size or inn for p, _ in members]
    unit = max((p.group_size for p, _ in members if p.group_size), default=1)
    block = unit * max(1, block // unit)  # whole groups of every member (group sizes divide 128)
    n = len(members)
    base = w.reshape(rows, inn).double()
    W = base.expand(n, rows, inn).clone()
    hinv = torch.stack([h.double() for _, h in members])  # (n, in, in)
    decoded = torch.zeros(n, rows, inn, dtype=torch.float64)
    scale = torch.zeros(n, rows)
    minimum = None if p0.symmetric else torch.zeros(n, rows)
    for b, (p, _) in enumerate(members):
        if p.group_size is None:  # one scale per row, from the whole row as fit_gptq does
            scale[b], mn = minmax_params(W[b].float(), p)
            if minimum is not None and mn is not None:
                minimum[b] = mn
    for i1 in range(0, inn, block):
        i2 = min(i1 + block, inn)
        W1, err1, h1 = W[:, :, i1:i2].clone(), torch.zeros(n, rows, i2 - i1, dtype=W.dtype), hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            for b, (p, _) in enumerate(members):
                if p.group_size is not None and c % gs[b] == 0:
                    scale[b], mn = minmax_params(W1[b, :, i:i + gs[b]].float(), p)
                    if minimum is not None and mn is not None:
                        minimum[b] = mn
            v = values(levels(W1[:, :, i:i + 1].float(), scale, minimum, p0), scale, minimum)[..., 0].double()
            decoded[:, :, c] = v
            err = (W1[:, :, i] - v) / h1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * h1[:, i, i:][:, None, :]
            err1[:, :, i] = err
        W[:, :, i2:] -= torch.bmm(err1, hinv[:, i1:i2, i2:])
    return decoded - base
