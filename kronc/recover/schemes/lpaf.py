"""Low-rank prune-and-factorize (LPAF, Ren & Zhu): factorize pruned weights, with per-layer ranks.

LPAF first prunes a fine-tuned model with a first-order criterion (`movement_prune` /
`MovementPruning`), then factorizes the pruned matrices. Two pieces here:

**Sparsity-aware SVD** (`sparsity_aware_svd`): the rank-``r`` ``X`` minimising the *weighted*
error ``Σ_ij M_ij (W_ij - X_ij)²``, where ``M`` is the pruning mask (pruned entries do not count:
they are free to take whatever value the low-rank structure gives them) or a non-negative
importance (scaled to ``[0, 1]`` by its maximum). Solved by EM-style imputation (Srebro &
Jaakkola, 2003)::

    X_0     = the better (in weighted error) of SVD_r(W) and SVD_r(M ⊙ W)
    X_{k+1} = SVD_r(M ⊙ W + (1 - M) ⊙ X_k)

For weights in ``[0, 1]`` no iteration increases the weighted error, so the result is never worse
than the plain truncated SVD of the weight or of the pruned weight; it stops after ``iters``
iterations or when an iteration improves the error by less than ``tol`` (relative). With an
all-ones mask the first iterate is ``SVD_r(W)`` itself, so it equals the plain truncated SVD
exactly. Factors are split as `LowRank.fit` splits them (``U sqrt(S)``, ``sqrt(S) Vᵀ``).

**Mixed ranks** (`lpaf_factorize` with `mixed_ranks`): the layers need not share a rank. The ranks
come from an explicit mapping, from a kronc `Plan`'s low-rank decisions, from a per-layer energy
threshold (the smallest ``r`` whose singular values hold ``energy`` of the masked weight's squared
Frobenius norm), or from a global budget (the highest energy threshold common to all layers that
fits, then the rest of the budget by relative energy gained per stored value). The factorized model is then
fine-tuned as it is: each layer trains its own ``u, v`` at its own rank (no rank schedule).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ...budget import Budget
from ...formats import LowRank, LowRankSpec
from ...formats.base import svd_dtype
from ...plan import Plan
from ._common import (
    DenseTarget,
    census,
    check_fraction,
    dense_targets,
    describe_filter,
    shared_weight,
    swap_in,
)


def _weights(mask_or_importance: Tensor, shape: tuple[int, ...]) -> Tensor:
    m = mask_or_importance.detach()
    if tuple(m.shape) != shape:
        raise ValueError(f"sparsity_aware_svd: mask_or_importance is {tuple(m.shape)}, the weight is {shape}")
    m = m.to(torch.float64)
    if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
        raise ValueError("sparsity_aware_svd: mask_or_importance must be finite and non-negative")
    top = float(m.max()) if m.numel() else 0.0
    if top <= 0:
        raise ValueError("sparsity_aware_svd: mask_or_importance is all zero (nothing to fit)")
    return m / top


def _svd_r(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(U_r sqrt(S_r), sqrt(S_r) V_rᵀ)``, split exactly as `LowRank.fit` splits it."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def sparsity_aware_svd(
    weight: Tensor, mask_or_importance: Tensor, rank: int, iters: int = 50, tol: float = 1e-9
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors ``(u, v)`` (``(out, r)``, ``(r, in)``, ``weight``'s dtype) minimising
    ``Σ M ⊙ (W - u v)²`` for a mask or non-negative importance ``M`` (see the module docstring)."""
    if weight.dim() != 2:
        raise ValueError(f"sparsity_aware_svd: weight must be a 2-D (out, in) matrix, got {tuple(weight.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(weight.shape):
        raise ValueError(f"sparsity_aware_svd: rank must be an integer in [1, {min(weight.shape)}], got {rank!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"sparsity_aware_svd: iters must be a non-negative integer, got {iters!r}")
    dtype = svd_dtype(weight)
    w = weight.detach().to(dtype)
    m = _weights(mask_or_importance, tuple(w.shape)).to(device=w.device, dtype=dtype)

    def error(x: Tensor) -> float:
        return float((m * (w - x).square()).sum())

    u, v = _svd_r(w, rank)
    if bool((m == 1).all()):
        return u.to(weight.dtype), v.to(weight.dtype)
    best, best_err = (u, v), error(u @ v)
    u2, v2 = _svd_r(m * w, rank)
    if (e := error(u2 @ v2)) < best_err:
        best, best_err = (u2, v2), e
    x = best[0] @ best[1]
    for _ in range(iters):
        u, v = _svd_r(m * w + (1 - m) * x, rank)
        x = u @ v
        e = error(x)
        improved = best_err - e
        if e <= best_err:
            best, best_err = (u, v), e
        if improved <= tol * max(best_err, 1e-300) or best_err == 0:
            break
    return best[0].to(weight.dtype), best[1].to(weight.dtype)


def masked_error(weight: Tensor, approx: Tensor, mask_or_importance: Tensor) -> float:
    """``Σ M (W - X)²`` with ``M`` scaled to ``[0, 1]`` as `sparsity_aware_svd` scales it."""
    m = _weights(mask_or_importance, tuple(weight.shape))
    return float((m * (weight.detach().double() - approx.detach().double()).square()).sum())


def energy_rank(weight: Tensor, energy: float, mask: Tensor | None = None) -> int:
    """Smallest rank whose singular values hold ``energy`` of ``||M ⊙ W||_F²``."""
    energy = check_fraction("energy_rank", "energy", energy)
    w = weight.detach().to(torch.float64)
    if mask is not None:
        w = w * mask.to(w)
    s2 = torch.linalg.svdvals(w).square()
    total = float(s2.sum())
    if total == 0:
        return 1
    cum = torch.cumsum(s2, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1


def mixed_ranks(
    weights: Mapping[str, Tensor],
    *,
    energy: float | None = None,
    budget: str | float | Budget | None = None,
    masks: Mapping[str, Tensor] | None = None,
    itemsize: int = 4,
) -> dict[str, int]:
    """Per-layer ranks for ``weights`` (module name -> ``(out, in)``), from ``energy`` or a global ``budget``.

    ``energy``: each layer's `energy_rank`. ``budget`` (``"4x"``, ``"1MB"``, ``"50k params"``, of the
    listed weights): the highest energy level ``e`` such that giving every layer its `energy_rank`
    for ``e`` fits (so every layer keeps the same share of its squared norm, and a layer with a flat
    spectrum gets a higher rank than one with a steep one), then what is left of the budget goes
    component by component to the largest ``s²/||W||² / (out + in)``. No layer goes below rank 1 or
    past the rank where low-rank stores as much as dense.

    Equal retained energy, not the greedy rule alone: greedy gain per stored value starves wide
    layers (each of their components costs ``out + in``), e.g. all-MiniLM-L6-v2's 1536x384 MLP
    matrices got rank 57 against 161-180 for the 384x384 attention ones at 2x, and the encoder
    lost most of its similarity score.
    """
    if (energy is None) == (budget is None):
        raise ValueError("mixed_ranks: give exactly one of energy= or budget=")
    masks = masks or {}
    if energy is not None:
        return {n: energy_rank(w, energy, masks.get(n)) for n, w in weights.items()}
    limit_unit, cap = Budget.parse(budget).limit(  # type: ignore[arg-type]
        sum(w.numel() for w in weights.values()) * itemsize, sum(w.numel() for w in weights.values()))
    unit_cost = {n: (w.shape[0] + w.shape[1]) * (itemsize if limit_unit == "bytes" else 1) for n, w in weights.items()}
    if sum(unit_cost.values()) > cap:
        raise ValueError(f"mixed_ranks: budget {budget!r} is below rank 1 for every layer "
                         f"({sum(unit_cost.values())} > {cap:.0f} {limit_unit})")
    spectra: dict[str, Tensor] = {}  # relative energy of each component, per layer
    kept: dict[str, Tensor] = {}  # relative energy kept by ranks 1, 2, ..., per layer
    top: dict[str, int] = {}  # the highest useful rank (`_useful`), per layer, at least 1
    for n, w in weights.items():
        x = w.detach().to(torch.float64)
        if n in masks:
            x = x * masks[n].to(x)
        s2 = torch.linalg.svdvals(x).square()
        spectra[n] = s2 / (float(s2.sum()) or 1.0)
        kept[n] = torch.cumsum(spectra[n], 0)
        out, inp = w.shape
        top[n] = max(1, min(out, inp, (out * inp - 1) // (out + inp)))

    def ranks_at(level: float) -> dict[str, int]:
        wanted = torch.tensor(level - 1e-12, dtype=torch.float64)
        return {n: min(int(torch.searchsorted(c, wanted)) + 1, top[n]) for n, c in kept.items()}

    def cost(ranks: Mapping[str, int]) -> float:
        return sum(r * unit_cost[n] for n, r in ranks.items())

    lo, hi = 0.0, 1.0  # cost(ranks_at(lo)) fits (every layer at rank 1); find the highest level that fits
    if cost(ranks_at(hi)) <= cap:
        lo = hi
    for _ in range(60):
        if hi - lo < 1e-12:
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(ranks_at(mid)) <= cap else (lo, mid)
    ranks = ranks_at(lo)
    spent = cost(ranks)
    heap = [(-float(spectra[n][r]) / unit_cost[n], n, r + 1) for n, r in ranks.items() if r < top[n]]
    heapq.heapify(heap)
    while heap:  # top up with what the common level left over
        _, n, r = heapq.heappop(heap)
        if spent + unit_cost[n] > cap:
            continue  # this layer's next component does not fit; smaller layers' might
        spent += unit_cost[n]
        ranks[n] = r
        if r < top[n]:
            heapq.heappush(heap, (-float(spectra[n][r]) / unit_cost[n], n, r + 1))
    return ranks


def _useful(w: Tensor, rank: int) -> bool:
    """Rank ``rank`` exists and stores fewer values than the dense weight."""
    out, inp = w.shape
    return rank <= min(out, inp) and rank * (out + inp) < out * inp


def lpaf_factorize(
    model: nn.Module,
    ranks: int | Mapping[str, int] | Plan | None = None,
    *,
    energy: float | None = None,
    budget: str | float | Budget | None = None,
    masks: Mapping[str, Tensor] | None = None,
    importance: Mapping[str, Tensor] | None = None,
    include: str | None = None,
    exclude: str | None = None,
    iters: int = 50,
) -> dict[str, int]:
    """Replace dense linears by `CompressedLinear(LowRank)` fitted with `sparsity_aware_svd`; returns the ranks.

    Exactly one of ``ranks`` (one for all, per module name, or a `Plan`'s low-rank decisions),
    ``energy`` or ``budget`` (see `mixed_ranks`). ``masks`` (from `movement_prune` or
    `MovementPruning.masks`) or ``importance`` (non-negative, per module name) weight the fit; layers
    with neither get the plain truncated SVD. Layers whose rank would store at least as many values
    as dense, and linears whose weight is tied to another module (e.g. an LM head tied to the
    embedding), stay dense and are absent from the result. Modifies ``model`` in place and records
    each new layer in its ``kronc_plan``.
    """
    given = sum(x is not None for x in (ranks, energy, budget))
    if given != 1:
        raise ValueError("lpaf_factorize: give exactly one of ranks=, energy= or budget=")
    targets = [t for t in dense_targets(model, include, exclude) if not shared_weight(model, t)]
    if isinstance(ranks, (Mapping, Plan)):
        wanted = _plan_ranks(ranks) if isinstance(ranks, Plan) else dict(ranks)
        unknown = sorted(set(wanted) - {t.name for t in dense_targets(model)})
        if unknown:
            raise ValueError(f"lpaf_factorize: ranks name {', '.join(unknown[:4])}, not dense Linear/Conv1D layers")
        targets = [t for t in targets if t.name in wanted]
    if not targets:
        raise ValueError(f"lpaf_factorize: no untied dense Linear/Conv1D weights{describe_filter(include, exclude)} in "
                         f"the model (found formats: {census(model)})")
    masks, importance = masks or {}, importance or {}
    weights = {t.name: t.data() for t in targets}
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        chosen = dict.fromkeys(weights, ranks)
    elif isinstance(ranks, (Mapping, Plan)):
        chosen = {n: wanted[n] for n in weights}
    else:
        itemsize = targets[0].param.element_size()
        chosen = mixed_ranks(weights, energy=energy, budget=budget, masks=masks, itemsize=itemsize)
    done: dict[str, int] = {}
    for t in targets:
        r = chosen[t.name]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"lpaf_factorize: the rank for {t.name} must be a positive integer, got {r!r}")
        if not _useful(t.data(), r):
            continue
        fmt = _fit(t, r, masks.get(t.name), importance.get(t.name), iters)
        swap_in(model, t, fmt)
        done[t.name] = r
    return done


def _fit(t: DenseTarget, rank: int, mask: Tensor | None, importance: Tensor | None, iters: int) -> LowRank:
    weight = t.data().detach()
    spec = LowRankSpec(rank=rank)
    if importance is None and mask is None:
        return LowRank.fit(weight, spec)
    m = importance if importance is not None else mask
    assert m is not None
    u, v = sparsity_aware_svd(weight, m.to(weight.device), rank, iters=iters)
    fmt = LowRank(u, v, spec)
    return fmt


def _plan_ranks(plan: Plan) -> dict[str, int]:
    out = {}
    for d in plan.decisions:
        if d.spec.factor_rank is not None:
            out[d.site.removesuffix(".weight")] = d.spec.factor_rank
    if not out:
        raise ValueError("lpaf_factorize: the plan has no low-rank decisions to take ranks from")
    return out
