"""Decisions for sites a policy stores at a fixed precision, outside the budget (`Policy.fixed`).

Why a separate path: the solver picks among candidates by damage under a budget; a site outside the
budget has nothing to trade against, so the least-damage choice would always be to keep it whole. A
fixed site's format is therefore given (the dense weight at one precision), priced exactly and
estimated like any dense candidate, and recorded in the plan with ``budgeted=False`` so the budget's
ratio (`Plan.ratio`) stays over the in-scope sites and `Plan.total_ratio` counts everything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ..formats import DenseSpec, FormatError
from ..plan import Decision, Plan
from ..sites import Site
from ..values import Precision
from .candidates import PlanningError
from .estimate import SiteAnalysis
from .options import SearchOptions


def fixed_spec(site: Site, precision: Precision, label: str) -> DenseSpec:
    """The dense spec at ``precision`` for ``site``; `PlanningError` naming the site, the entry and the allowed
    values when the weight cannot take it (e.g. a group size that does not divide its width)."""
    spec = DenseSpec(precision=precision)
    try:
        spec.check(site.shape)
    except FormatError as e:
        raise PlanningError(f"site {site.name}: {label}.precision {precision.describe()} cannot store it: {e}") from None
    return spec


def fixed_decisions(sites: Sequence[Site], weights: Mapping[str, Tensor], fixed: Mapping[str, tuple[Precision, str]],
                    options: SearchOptions | None = None) -> list[Decision]:
    """One ``budgeted=False`` decision per site in ``fixed`` (site name -> (precision, entry label)), with its exact
    bytes and its estimated relative error in the weight metric (a lookup table has no input moments)."""
    options = options or SearchOptions()
    out = []
    for site in sites:
        if site.name not in fixed:
            continue
        precision, label = fixed[site.name]
        spec = fixed_spec(site, precision, label)
        error = float(SiteAnalysis(weights[site.name], None, options.damping).errors([spec])[0])
        out.append(Decision.of(site, spec, error=error, rule=label, budgeted=False))
    return out


def with_fixed(plan: Plan, fixed: Sequence[Decision], order: Sequence[str]) -> Plan:
    """``plan`` with the ``fixed`` decisions added, all in site ``order``."""
    rank = {name: i for i, name in enumerate(order)}
    decisions = sorted([*plan.decisions, *fixed], key=lambda d: rank.get(d.site, len(rank)))
    return plan.model_copy(update={"decisions": decisions})
