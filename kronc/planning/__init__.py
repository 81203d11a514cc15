"""Planning: pick one format per site so the model meets a budget with the least damage.

``candidates`` (what each site may become) -> ``estimate`` (how wrong each would be, all at once)
-> ``solver`` (one per site under the budget) -> ``planner`` (the `Plan`). ``calibrate`` collects
the input moments for the data-aware metric and ``fit`` fits a planned spec the way it was measured.
"""

from .calibrate import InputMoments, collect_input_moments, collect_sensitivity
from .candidates import Candidate, PlanningError, divisor_pairs, factor_shapes, site_candidates
from .estimate import SiteAnalysis, estimate_errors
from .fit import fit_site, fit_sites
from .options import SearchOptions
from .planner import make_plan, uniform_plan
from .solver import lp_bound, solve, solve_exact

__all__ = [
    "Candidate", "InputMoments", "PlanningError", "SearchOptions", "SiteAnalysis", "collect_input_moments", "collect_sensitivity",
    "divisor_pairs",
    "estimate_errors", "factor_shapes", "fit_site", "fit_sites", "lp_bound", "make_plan", "site_candidates", "solve",
    "solve_exact", "uniform_plan",
]
