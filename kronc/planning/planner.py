"""Plans from sites, weights, allowed formats and a budget: enumerate, estimate, solve.

**Damage** (what the solver minimises, summed over sites): the *absolute* squared error
``err_rel^2 * ||W||_F^2`` per site, i.e. ``||W - W'||_F^2``, which is the expected squared output
error ``E ||(W - W') x||^2`` for white unit-variance inputs. With input moments ``H`` it is
``err_rel^2 * tr(W H_d W^T) = tr((W - W') H_d (W - W')^T)``, the expected squared output error on
the calibration distribution. Absolute rather than relative error, because perturbations of
different layers add up in the residual stream in absolute terms, and a relative objective would
let a site whose output is tiny claim as much budget as one whose output dominates.

The ``importance`` multiplier per site folds in how much the model's output moves per unit of
output error at that site: `calibrate.collect_sensitivity` measures it (the Fisher information per
output feature, ``κ``), and `kronc.plan` / `kronc.compile` pass it by default whenever they
calibrate (policy ``solver.sensitivity``). It matters more than anything else in the damage model
(the measurement: ``benchmarks/results/design_measurements.md``, "sensitivity").
Sites missing from ``importance`` get the median of the given values.

When moments are given for only some sites, a site without moments is measured in the weight metric
scaled by the median per-input-channel energy ``tr(H_d) / in`` of the sites that have them, i.e. as
if its inputs were white with typical energy, so that both kinds of damage are in the same units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from ..budget import Budget, BudgetError
from ..formats import FormatSpec
from ..plan import Decision, Plan
from ..sites import Site
from ..values.threads import single_threaded
from .candidates import Candidate, PlanningError, site_candidates
from .estimate import SiteAnalysis
from .families import FAMILIES, Choice, family
from .options import SearchOptions
from .shared import PerInput
from .solver import solve
from .whiten import damped

T = TypeVar("T")


def map_sites(fn: Callable[[Site], T], sites: Sequence[Site], workers: int, desc: str, progress: bool) -> list[T]:
    """``[fn(site) for site in sites]`` on ``workers`` threads, torch single-threaded, with a progress bar.

    See `SearchOptions.workers` for why torch runs single-threaded here.
    """
    with tqdm(total=len(sites), desc=desc, unit="site", disable=not progress) as bar, single_threaded():
        if workers <= 1 or len(sites) <= 1:
            out = []
            for site in sites:
                out.append(fn(site))
                bar.update()
            return out
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(fn, site) for site in sites]
            for f in as_completed(futures):
                f.result()
                bar.update()
            return [f.result() for f in futures]


def _weight(weights: Mapping[str, Tensor], site: Site) -> Tensor:
    try:
        w = weights[site.name]
    except KeyError:
        raise KeyError(f"no weight given for site {site.name!r}") from None
    if tuple(w.shape) != tuple(site.shape):
        raise ValueError(
            f"weight for {site.name!r} has shape {tuple(w.shape)} but the site is {site.shape[0]}x{site.shape[1]}; "
            "pass logical (out, in) weights (Conv1D weights transposed)"
        )
    return w


def site_energy(moments: Tensor, damping: float) -> float:
    """A site's per-input-channel energy ``tr(H_d) / in`` (see the module docstring)."""
    return float(damped(moments, damping).diagonal().mean())


def white_energy(energies: Sequence[float]) -> float:
    """Median of the sites' `site_energy` (1 when none have moments)."""
    return float(np.median(list(energies))) if len(energies) else 1.0


def _white_energy(moments: Mapping[str, Tensor] | None, names: Sequence[str], damping: float) -> float:
    """Median ``tr(H_d) / in`` over the sites with moments (1 when none have them)."""
    if not moments:
        return 1.0
    return white_energy([site_energy(moments[n], damping) for n in names if n in moments])


@dataclass(frozen=True)
class SiteCurve:
    """What the analysis of one site's weight gives: the relative error of each priced candidate and the
    site's error scale (``SiteAnalysis.total``). Small, so a streamed compile keeps every site's curve
    after dropping the weights, and turns them into damage tables (`damage_table`) once every site is seen."""

    errors: tuple[float, ...]
    total: float


def site_curve(weight: Tensor, moments: Tensor | None, cands: Sequence[Candidate], options: SearchOptions,
               folds: tuple[Tensor, Tensor] | None = None, shared: PerInput | None = None) -> SiteCurve:
    """Analyse one site: the relative error of every candidate in ``cands`` (as `make_plan` does; ``shared``:
    work per input kept across sites, `PerInput`)."""
    analysis = SiteAnalysis(weight, moments, options.damping, folds=folds, shared=shared)
    errors = analysis.errors([c.spec for c in cands], nbytes=[c.nbytes for c in cands])
    return SiteCurve(tuple(float(e) for e in errors), analysis.total)


def damage_table(cands: Sequence[Candidate], curve: SiteCurve, white: float = 1.0, importance: float = 1.0
                 ) -> list[Candidate]:
    """The candidates with their errors and damage ``error^2 * total * white * importance`` (the solver's
    input); ``white`` is `white_energy` for a site measured without moments in a data-aware plan, else 1.
    A NaN error marks a dominated candidate that was not estimated (see `SiteAnalysis.errors`): left out."""
    scale = curve.total * white * importance
    return [
        Candidate(c.spec, c.nbytes, c.nparams, c.choice, e, e ** 2 * scale)
        for c, e in zip(cands, curve.errors, strict=True) if not math.isnan(e)
    ]


def price_sites(scope: Sequence[Site], spaces: Mapping[str, Sequence[Choice]], options: SearchOptions
                ) -> dict[str, list[Candidate]]:
    """Every in-scope site's candidates with their exact sizes (no weights needed)."""
    priced = {}
    for s in scope:
        try:
            priced[s.name] = site_candidates(s.shape, s.dtype, spaces[s.name], options)
        except PlanningError as e:
            raise PlanningError(f"site {s.name}: {e}") from None
    return priced


def budget_limit(scope: Sequence[Site], priced: Mapping[str, Sequence[Candidate]], budget: Budget
                 ) -> tuple[Literal["bytes", "params"], float]:
    """The budget's unit and limit over ``scope``; `BudgetError` when even the smallest candidates exceed it
    (checked before any analysis, which is the slow part)."""
    dense_bytes = sum(s.nbytes for s in scope)
    dense_params = sum(s.numel for s in scope)
    key, limit = budget.limit(dense_bytes, dense_params)
    smallest = sum(min(c.cost(key) for c in cands) for cands in priced.values())
    if smallest > limit:  # `solve` would say the same, after the analysis
        ratio = f" ({dense_bytes / smallest:.1f}x)" if key == "bytes" and smallest else ""
        raise BudgetError(
            f"budget {budget} allows {_size(limit, key)} for the {len(scope)} in-scope sites "
            f"({_size(dense_bytes if key == 'bytes' else dense_params, key)} dense), but the smallest plan the "
            f"allowed formats reach is {_size(smallest, key)}{ratio}; loosen the budget or allow smaller formats"
        )
    return key, limit


def plan_from_tables(scope: Sequence[Site], tables: Sequence[Sequence[Candidate]], budget: Budget, key: Literal["bytes", "params"],
                     limit: float, *, data: bool, rules: Mapping[str, str | None] | None = None, options: SearchOptions | None = None) -> Plan:
    """Solve the multiple-choice knapsack over the sites' damage tables and write the decisions."""
    options = options or SearchOptions()
    picks = solve(tables, limit, key, grid=options.dp_grid)
    decisions = [
        Decision(
            site=site.name, shape=site.shape, spec=t[i].spec, bytes_before=site.nbytes, bytes_after=t[i].nbytes,
            params_after=t[i].nparams, error=t[i].error, rule=(rules or {}).get(site.name),
        )
        for site, t, i in zip(scope, tables, picks, strict=True)
    ]
    return Plan(decisions=decisions, budget=budget, objective="data" if data else "weight")


def _size(n: float, key: str) -> str:
    return f"{n:,.0f} bytes" if key == "bytes" else f"{n:,.0f} parameters"


def make_plan(
    sites: Sequence[Site],
    weights: Mapping[str, Tensor],
    spaces: Mapping[str, Sequence[Choice]],
    budget: Budget | str | float,
    moments: Mapping[str, Tensor] | None = None,
    rules: Mapping[str, str | None] | None = None,
    progress: bool = True,
    *,
    options: SearchOptions | None = None,
    importance: Mapping[str, float] | None = None,
    cache: dict[str, list[Candidate]] | None = None,
) -> Plan:
    """One decision per site in ``spaces``: least total damage within ``budget``.

    ``weights`` holds each site's logical ``(out, in)`` weight; ``spaces`` the formats each in-scope
    site may use (sites not in it are out of scope and not in the plan); ``budget`` counts only the
    in-scope sites (a ratio is over their dense bytes); ``moments`` the ``(in, in)`` input second
    moments from `calibrate.collect_input_moments` for a data-aware plan; ``rules`` the name of the
    policy rule that gave each site its space (recorded in the decisions); ``importance`` a
    sensitivity multiplier per site (see the module docstring). ``cache``: a dict that keeps each
    site's analysed candidates; pass the same one to plan the same sites, weights, spaces, moments
    and importance at several budgets without analysing them again.
    """
    options = options or SearchOptions()
    budget = Budget.parse(budget)
    known = {s.name for s in sites}
    stray = sorted(set(spaces) - known)
    if stray:
        raise KeyError(f"format spaces given for unknown sites: {', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''}")
    scope = [s for s in sites if s.name in spaces]
    data = bool(moments) and any(s.name in moments for s in scope)  # type: ignore[operator]
    # only sites measured without moments in a data-aware plan use it (damping every H costs ~0.1 s a site)
    unmeasured = data and any(s.name not in moments for s in scope)  # type: ignore[operator]
    white = _white_energy(moments, [s.name for s in scope], options.damping) if unmeasured else 1.0
    folds = getattr(moments, "folds", None) or {}
    given = [float(v) for k, v in (importance or {}).items() if k in spaces]
    typical = float(np.median(given)) if given else 1.0
    priced = price_sites(scope, spaces, options)
    key, limit = budget_limit(scope, priced, budget)
    shared = PerInput()  # GPTQ inverses per calibration fold, computed once for the sites reading one input

    def analyse(site: Site) -> list[Candidate]:
        if cache is not None and site.name in cache:
            return cache[site.name]
        h = moments.get(site.name) if moments else None
        curve = site_curve(_weight(weights, site), h, priced[site.name], options, folds.get(site.name), shared)
        return damage_table(priced[site.name], curve, white if data and h is None else 1.0,
                            float(importance.get(site.name, typical)) if importance else 1.0)

    tables = map_sites(analyse, scope, options.worker_count(), "kronc: analysing sites", progress)
    if cache is not None:
        cache.update({site.name: table for site, table in zip(scope, tables, strict=True)})
    return plan_from_tables(scope, tables, budget, key, limit, data=data, rules=rules, options=options)


# ------------------------------------------------------------------------------------------ uniform


def _uniform_specs(site: Site, fmt: str, cap: float, options: SearchOptions) -> list[FormatSpec]:
    """Specs of format ``fmt`` storing at most ``cap`` bytes, one per structural variant (its family's)."""
    if fmt not in FAMILIES:
        raise ValueError(f"unknown format {fmt!r}: use {', '.join(FAMILIES)}")
    return family(fmt).uniform(site.shape, site.itemsize, cap, options)


def uniform_plan(
    sites: Sequence[Site],
    weights: Mapping[str, Tensor],
    fmt: str,
    ratio: float | str,
    *,
    moments: Mapping[str, Tensor] | None = None,
    options: SearchOptions | None = None,
    progress: bool = False,
) -> Plan:
    """Every site in format ``fmt`` at the same ratio: each site stores at most ``dense / ratio`` bytes.

    A baseline for the planner. ``lowrank`` takes the largest rank that fits; ``kronecker`` the most
    terms that fit for each factor shape `factor_shapes` offers, then the shape with the least
    estimated error; ``doped`` is unstructured magnitude pruning (no base) at the largest density
    whose values plus index fit; ``blocksparse`` the largest block density that fits, for each
    default block shape that divides the weight, then the one with the least estimated error.
    """
    options = options or SearchOptions()
    budget = Budget.parse(ratio)
    if budget.unit != "ratio":
        raise BudgetError(f"uniform plans take a ratio such as '4x', got {ratio!r}")
    data = bool(moments)

    def decide(site: Site) -> Decision:
        weight = _weight(weights, site)
        cap = site.nbytes / budget.value
        specs = _uniform_specs(site, fmt, cap, options)
        if not specs:
            raise BudgetError(
                f"{site.name} ({site.shape[0]}x{site.shape[1]}) has no {fmt} setting within {math.floor(cap):,} bytes "
                f"({budget} of {site.nbytes:,})"
            )
        h = moments.get(site.name) if moments else None
        errors = SiteAnalysis(weight, h, options.damping).errors(specs)
        best = min(range(len(specs)), key=lambda i: (errors[i], specs[i].nbytes(site.shape, site.itemsize), i))
        spec = specs[best]
        return Decision.of(site, spec, error=float(errors[best]), rule=f"uniform {fmt}")

    decisions = map_sites(decide, sites, options.worker_count(), f"kronc: uniform {fmt}", progress)
    return Plan(decisions=decisions, budget=budget, objective="data" if data else "weight")

