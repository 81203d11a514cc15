"""GPTQ (2210.17323), one implementation for the fit and the planner's estimate: many fits in one column loop.

GPTQ quantizes a weight column by column and spreads each column's rounding error over the columns not
yet quantized through the upper Cholesky factor of the damped inverse Gram matrix (`gptq_hinv`). The loop
over columns is sequential, and on CPU its per-column Python work, not its arithmetic, is most of what it
costs. `gptq_batch` therefore runs any number of fits (*members*) in one loop: each member is a weight
``(rows, in)``, a `Precision` and a ``hinv``; members may differ in bit width, symmetry, group size and
``hinv`` (e.g. one per calibration fold). Rows are independent given ``hinv`` (scales are per row and
group), so sites that read the same input (q/k/v, gate/up) are one member of their stacked rows (``splits``).

Every member goes through the same steps as a fit of its own: lazy block updates (blocks of whole groups,
128 columns, the rest of the weight updated by one matmul per block), group scales from the updated
columns as each group is reached. Per column the arithmetic is elementwise, and the block product is one matmul per member (per part of
it), so every fit comes out exactly as it would alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from .grid import Levels, level_range, minmax_params
from .precision import Precision, PrecisionError
from .threads import single_threaded

GPTQ_DAMPING = 0.1
"""GPTQ's damping, a share of the mean diagonal of ``H`` added to it. 10% rather than GPTQ's 1%: with a
few thousand calibration tokens, 1% fits them too closely and transfers worse to other text (SmolLM2,
King James calibration, ABC news evaluation: every int4/int3 configuration of
``benchmarks/results/quality_quant.md`` is better at 10%)."""


def gptq_hinv(h: Tensor, damp: float = GPTQ_DAMPING) -> Tensor:
    """The upper Cholesky factor of the inverse of ``h`` damped by ``damp`` times its mean diagonal (dead
    inputs set to 1), float64: what GPTQ propagates errors with (one per ``h``, shared by precisions).

    Computed with torch single-threaded: CPU LAPACK's Cholesky inverse (``potri``) rounds differently
    with the thread count, and on 2 threads it took 10x as long as on one (1536x1536: 8.1 s against
    0.8 s on this project's shared 2-core machine); so the fit does not depend on the caller's threads."""
    with single_threaded() if h.device.type == "cpu" else nullcontext():
        H = h.double().clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def _check(w: Tensor, members: Sequence[tuple[Precision, Tensor]]) -> tuple[int, int]:
    if not members:
        raise PrecisionError("gptq: no members to fit")
    if w.dim() == 3 and w.shape[0] != len(members):
        raise PrecisionError(f"gptq: {w.shape[0]} weights for {len(members)} members")
    rows, inn = int(w.shape[-2]), int(w.shape[-1])
    for p, hinv in members:
        if p.is_float:
            raise PrecisionError(f"gptq: precision {p.describe()} is a float cast; it has no integer levels to fit")
        if p.group_size is not None and inn % p.group_size:
            raise PrecisionError(f"gptq: group_size {p.group_size} does not divide the input dimension {inn}")
        if tuple(hinv.shape) != (inn, inn):
            raise PrecisionError(f"gptq: hinv must be ({inn}, {inn}) for last dimension {inn}, got {tuple(hinv.shape)}")
    return rows, inn


def _ranges(sizes: Sequence[int], rows: int) -> list[tuple[int, int]]:
    if sum(sizes) != rows or any(k <= 0 for k in sizes):
        raise PrecisionError(f"gptq: splits {list(sizes)} must be positive row counts summing to {rows}")
    ends = [sum(sizes[:k + 1]) for k in range(len(sizes))]
    return [(e - k, e) for e, k in zip(ends, sizes, strict=True)]


def gptq_batch(w: Tensor, members: Sequence[tuple[Precision, Tensor]], block: int = 128,
               splits: Sequence[Sequence[int]] | None = None) -> list[Levels]:
    """The GPTQ levels of every ``(precision, hinv)`` member, all in one column loop.

    ``w``: ``(rows, in)``, the weight every member fits, or ``(members, rows, in)``, one weight per member.
    ``hinv``: `gptq_hinv` of the member's Gram matrix. ``splits``: per member, the row counts of the
    weights stacked in it (summing to ``rows``); each part gets its own block product, so its levels are
    exactly those of a fit of its own (a float64 matrix product's rows can round differently with
    the number of rows it is computed with). Returns `Levels` per member, in order (``q`` ``(rows,
    groups, group)``)."""
    rows, inn = _check(w, members)
    parts = [[(0, rows)] for _ in members] if splits is None else [_ranges(s, rows) for s in splits]
    n = len(members)
    ps = [p for p, _ in members]
    unit = math.lcm(1, *(p.group_size for p in ps if p.group_size))
    block = unit * max(1, block // unit)  # whole groups of every member
    hinvs = [h.double() for _, h in members]
    W = w.reshape(-1, rows, inn).double().expand(n, rows, inn).clone()
    lows = [float(level_range(p)[0]) for p in ps]
    highs = [float(level_range(p)[1]) for p in ps]
    one_range = len(set(zip(lows, highs, strict=True))) == 1
    lo: Tensor | float = lows[0] if one_range else torch.tensor(lows)[:, None]
    hi: Tensor | float = highs[0] if one_range else torch.tensor(highs)[:, None]
    asym = any(not p.symmetric for p in ps)
    # group classes: members whose scales are recomputed together (same group size, bits and symmetry)
    # (a group size of None: one scale per row, from the whole row before any update, as `fit_gptq` did)
    classes: dict[tuple[int | None, int, bool], list[int]] = {}
    for b, p in enumerate(ps):
        classes.setdefault((p.group_size, p.bits, p.symmetric), []).append(b)
    width = {key: key[0] or inn for key in classes}
    cls_idx = {key: torch.tensor(idx) for key, idx in classes.items()}
    cls_scale = {key: torch.zeros(len(idx), rows, inn // width[key]) for key, idx in classes.items()}
    cls_min = {key: torch.zeros(len(idx), rows, inn // width[key]) for key, idx in classes.items() if not key[2]}
    scale = torch.zeros(n, rows)
    minimum = torch.zeros(n, rows)  # zero for symmetric members: adding it changes no value
    safe = torch.ones(n, rows)
    Q = torch.zeros(n, rows, inn)

    def new_scales(key: tuple[int | None, int, bool], wg: Tensor, k: int) -> None:
        idx = cls_idx[key]
        sc, mn = minmax_params(wg, ps[classes[key][0]])
        cls_scale[key][:, :, k] = sc
        scale[idx] = sc
        safe[idx] = torch.where(sc == 0, torch.ones_like(sc), sc)
        if mn is not None:
            cls_min[key][:, :, k] = mn
            minimum[idx] = mn

    for key in classes:
        if key[0] is None:
            new_scales(key, W[cls_idx[key]].float(), 0)
    grouped = [(key, key[0]) for key in classes if key[0] is not None]
    for i1 in range(0, inn, block):
        i2 = min(i1 + block, inn)
        # the block column-major, (n, cols, rows): each column's update of the later ones is one contiguous
        # elementwise pass over the rows (the same products and differences as row-major, faster)
        W1 = W[:, :, i1:i2].transpose(1, 2).contiguous()
        E = torch.zeros(n, rows, i2 - i1, dtype=W.dtype)
        h1 = torch.stack([h[i1:i2, i1:i2] for h in hinvs])
        d = h1.diagonal(dim1=1, dim2=2)[:, :, None]  # (n, cols, 1)
        for i in range(i2 - i1):
            c = i1 + i
            for key, g in grouped:
                if c % g == 0:
                    new_scales(key, W1[cls_idx[key], i:i + g].transpose(1, 2).float(), c // g)
            x = W1[:, i]
            q = (x.float() - minimum if asym else x.float()).div_(safe).round_().clamp_(lo, hi)  # type: ignore[arg-type]
            Q[:, :, c] = q
            v = q.mul_(scale)
            err = (x - (v.add_(minimum) if asym else v).double()).div_(d[:, i])
            W1[:, i:].sub_(h1[:, i, i:, None] * err[:, None, :])
            E[:, :, i] = err
        for b in range(n if i2 < inn else 0):  # one product per part: its rows alone decide its rounding
            for r1, r2 in parts[b]:
                W[b, r1:r2, i2:].sub_(E[b, r1:r2] @ hinvs[b][i1:i2, i2:])
    out: dict[int, Levels] = {}
    for key, idx in classes.items():
        g = width[key]
        for j, b in enumerate(idx):
            mn_b = cls_min[key][j] if key in cls_min else None
            out[b] = Levels(Q[b].to(torch.int32).reshape(rows, inn // g, g), cls_scale[key][j], mn_b)
    return [out[b] for b in range(n)]


def fit_gptq(w: Tensor, p: Precision, h: Tensor, damp: float = GPTQ_DAMPING, block: int = 128,
             hinv: Tensor | None = None) -> Levels:
    """GPTQ of one weight ``w`` (any shape ``(..., in)``) at ``p`` with the Gram matrix ``h = X^T X``
    ``(in, in)`` (`gptq_batch` with one member). ``hinv``: `gptq_hinv` of ``h`` at ``damp`` when already
    computed."""
    rows, inn = p.check_shape(tuple(w.shape))
    if tuple(h.shape) != (inn, inn):
        raise PrecisionError(f"fit='gptq': H must be ({inn}, {inn}) for last dimension {inn}, got {tuple(h.shape)}")
    return gptq_batch(w.reshape(rows, inn), [(p, gptq_hinv(h, damp) if hinv is None else hinv)], block)[0]


def gptq_residuals(w: Tensor, members: list[tuple[Precision, Tensor]], block: int = 128) -> Tensor:
    """``fit_gptq(w, p, hinv=hinv).values() - w`` for every ``(p, hinv)`` member at once, float64
    ``(members, rows, in)`` (`gptq_batch`): the planner's estimate of GPTQ on a few sampled rows, where the
    per-column Python work, not the arithmetic, is the cost."""
    if not members:
        return torch.zeros(0, *w.shape, dtype=torch.float64)
    rows, inn = members[0][0].check_shape(tuple(w.shape))
    base = w.reshape(rows, inn).double()
    fits = gptq_batch(base, members, block)
    return torch.stack([lv.values().reshape(rows, inn).double() for lv in fits]) - base
