"""The pipeline's state and its last step: one object carried through capture, calibrate, plan and apply,
and one `materialize` that turns a plan into modules (used by `kronc.apply`, `kronc.load` and the
torch.compile backend alike).

`PipelineState` resolves the policy's scope once (`scope`) and keeps the statistics calibration
collects, so `kronc.compile` reads each thing once::

    state = PipelineState.start(model, policy, example_inputs)   # capture + scope
    state.calibrate(batches)                                      # input moments, sensitivity
    state.make_plan()                                             # analyse, solve
    small = state.apply(output="auto")                            # fit, materialize
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn
from tqdm.auto import tqdm

from .capture import Captured, CaptureError, capture
from .formats import Factorized, FormatSpec
from .inputs import (
    calibration_batches,
    check_example_inputs,
    check_finite_weights,
    check_model,
    check_moments,
)
from .passes.rewrite import compress_sites
from .passes.swap import swap_modules, swappable
from .passes.verify import output_signature, verify
from .plan import Plan
from .planning import collect_input_moments, collect_sensitivity, fit_sites, make_plan
from .planning.fixed import fixed_decisions, with_fixed
from .policies import Policy, Resolution, resolve
from .policies.errors import PolicyError, Problem
from .sites import Site

Output = Literal["auto", "module", "graph"]


def scope(captured: Captured, policy: Policy, *, warn: bool = True) -> tuple[Resolution, list[Site]]:
    """The policy's resolution over the sites, and the in-scope sites (at least one: else `CaptureError` for a model without weights, `PolicyError` at the scope key)."""
    resolution = resolve(policy, captured.sites, warn=warn)
    in_scope = [s for s in captured.sites if resolution[s.name].in_scope]
    if not captured.sites:
        raise CaptureError(f"{type(captured.model).__name__} has no compressible weights (Linear, Conv1D, F.linear, Embedding, LSTM)")
    if not in_scope:
        raise _empty_scope(captured, policy)
    return resolution, in_scope


def _empty_scope(captured: Captured, policy: Policy) -> PolicyError:
    """The policy error for a scope that leaves no site, at the key most likely to blame."""
    kinds = sorted({s.kind for s in captured.sites})
    where = "scope.include" if policy.scope.include else "scope.exclude" if policy.scope.exclude else "scope.kinds"
    return PolicyError([Problem(
        "<policy>", where,
        f"none of the {len(captured.sites)} sites of {type(captured.model).__name__} is in scope "
        f"(scope.kinds: {', '.join(policy.scope.kinds)}; include: {len(policy.scope.include)} pattern(s), "
        f"exclude: {len(policy.scope.exclude)}; site kinds here: {', '.join(kinds)}); "
        "widen scope.include or add these kinds to scope.kinds",
    )])


@dataclass
class PipelineState:
    """Everything one compression carries from stage to stage."""

    captured: Captured
    policy: Policy
    resolution: Resolution
    in_scope: list[Site]
    moments: Mapping[str, Tensor] | None = None
    """Input second moments per in-scope site (data objective with calibration), see `calibrate`."""
    importance: Mapping[str, float] | None = None
    """Per-site sensitivity (policy ``solver.sensitivity``), see `calibrate`."""
    plan: Plan | None = None
    progress: bool = False

    @classmethod
    def start(cls, model: nn.Module | Captured, policy: Policy, example_inputs: Any = None, *, warn: bool = True,
              progress: bool = False) -> PipelineState:
        """Check ``model`` and ``example_inputs`` (`kronc.inputs`), capture the model (unless it is captured
        already), resolve ``policy``'s scope once and check the in-scope weights are finite."""
        if not isinstance(model, Captured):
            check_model(model)
            example_inputs = check_example_inputs(model, example_inputs)
        captured = model if isinstance(model, Captured) else capture(model, example_inputs)
        resolution, in_scope = scope(captured, policy, warn=warn)
        check_finite_weights(in_scope, captured.weight)
        return cls(captured, policy, resolution, in_scope, progress=progress)

    def calibrate(self, calibration: Iterable[Any] | None) -> PipelineState:
        """Input moments from every batch and sensitivity from the first ``solver.sensitivity_batches``
        (data objective only; nothing without calibration)."""
        if calibration is None or self.policy.objective != "data":
            return self
        model = self.captured.model
        batches = calibration_batches(model, calibration)  # a checked list: read twice (moments, sensitivity)
        self.moments = collect_input_moments(model, self.in_scope, batches, progress=self.progress)
        check_moments(self.moments)
        if self.policy.solver.sensitivity != "none":
            found = collect_sensitivity(model, self.in_scope, batches, max_batches=self.policy.solver.sensitivity_batches,
                                        progress=self.progress)
            self.importance = found or None
        return self

    def make_plan(self) -> Plan:
        """One format per in-scope site under the policy's budget (`kronc.planning.make_plan`)."""
        spaces = {s.name: list(self.resolution[s.name].formats) for s in self.in_scope}
        rules = {s.name: self.resolution[s.name].rule for s in self.in_scope}
        plan = make_plan(
            self.in_scope, {s.name: self.captured.weight(s) for s in self.in_scope}, spaces, self.policy.budget,
            moments=self.moments, rules=rules, progress=self.progress, importance=self.importance,
        )
        fixed = {r.site.name: (r.fixed, r.rule or "fixed") for r in self.resolution.sites if r.fixed is not None}
        if fixed:  # sites stored at a fixed precision, outside the budget (`Policy.fixed`)
            sites = [s for s in self.captured.sites if s.name in fixed]
            decisions = fixed_decisions(sites, {s.name: self.captured.weight(s) for s in sites}, fixed)
            plan = with_fixed(plan, decisions, [s.name for s in self.captured.sites])
        self.plan = plan
        return plan

    def apply(self, output: Output = "auto", *, inplace: bool = False) -> nn.Module:
        """Fit the plan's formats (data-aware with the moments) and materialize them on a copy of the model."""
        assert self.plan is not None, "make_plan first"
        return apply_plan(self.captured, self.plan, output=output, inplace=inplace, moments=self.moments,
                          progress=self.progress)


def apply_plan(captured: Captured, plan: Plan, *, output: Output = "auto", inplace: bool = False,
               moments: Mapping[str, Tensor] | None = None, progress: bool = False) -> nn.Module:
    """Fit ``plan``'s formats to ``captured``'s weights and materialize them (on a copy unless ``inplace``)."""
    sites = {s.name: s for s in captured.sites}
    chosen = [sites[d.site] for d in plan.decisions if not d.spec.identity and d.site in sites]
    mode = output_mode(output, captured, chosen)
    bar = tqdm(total=len(chosen), desc="fit", unit="site", disable=not progress)

    try:
        check_plan(plan, sites)  # before the fits: a plan for another model fails at once
        check_finite_weights(chosen, captured.weight)
        fits = fit_sites([(captured.weight(s), plan[s.name].spec, (moments or {}).get(s.name)) for s in chosen],
                         done=lambda _: bar.update())
        by_name = dict(zip((s.name for s in chosen), fits, strict=True))

        def fitted(site: Site, spec: FormatSpec) -> Factorized:
            return by_name[site.name]

        if mode == "module":
            return materialize(plan, sites, fitted, model=captured.model if inplace else copy.deepcopy(captured.model))
        gm = captured.graph_module if inplace else copy.deepcopy(captured.graph_module)
        return materialize(plan, sites, fitted, graph=gm, args=captured.example_args, kwargs=captured.example_kwargs)
    finally:
        bar.close()


def output_mode(output: Output, captured: Captured, chosen: list[Site]) -> Literal["module", "graph"]:
    """``auto``: a graph for graph inputs or sites no module swap can reach (functional), else modules."""
    if output not in ("auto", "module", "graph"):
        raise ValueError(f"output must be 'auto', 'module' or 'graph', got {output!r}")
    if output != "auto":
        return output
    if isinstance(captured.model, torch.fx.GraphModule):
        return "graph"
    return "module" if all(swappable(s) for s in chosen) else "graph"


def check_plan(plan: Plan, sites: Mapping[str, Site]) -> None:
    """`KeyError` / `ValueError` when ``plan`` names a site ``sites`` lacks or of another shape."""
    missing = [d.site for d in plan.decisions if d.site not in sites]
    if missing:
        raise KeyError(f"the plan names sites this model does not have: {', '.join(missing)}")
    for d in plan.decisions:
        if tuple(d.shape) != sites[d.site].shape:
            raise ValueError(f"site {d.site} is {sites[d.site].shape} in this model but {tuple(d.shape)} in the plan")


def materialize(
    plan: Plan,
    sites: Mapping[str, Site],
    make: Callable[[Site, FormatSpec], Factorized],
    *,
    model: nn.Module | None = None,
    graph: fx.GraphModule | None = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Turn ``plan`` into modules, in place: each non-dense decision's site gets ``make(site, spec)``
    (a fit, or an empty format to load a state dict into), swapped into ``model`` or rewritten into
    ``graph`` (verified on ``args``/``kwargs`` when given). The result carries the plan as ``kronc_plan``.

    Raises `KeyError` / `ValueError` when the plan names a site ``sites`` lacks or of another shape.
    """
    if (model is None) == (graph is None):
        raise ValueError("materialize needs exactly one of model= (swap modules) or graph= (rewrite the graph)")
    check_plan(plan, sites)
    chosen = [sites[d.site] for d in plan.decisions if not d.spec.identity]
    weights = {s.name: make(s, plan[s.name].spec) for s in chosen}
    if model is not None:
        out = swap_modules(model, chosen, weights)
    else:
        assert graph is not None
        expected = output_signature(graph, args, kwargs)
        out = compress_sites(graph, chosen, weights)
        verify(out, "compress_sites", args, kwargs, expected)
    out.kronc_plan = plan  # type: ignore[assignment]
    return out
