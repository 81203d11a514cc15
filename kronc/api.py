"""The public pipeline: capture -> plan -> apply, and `compile`, which is those calls in a row."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from .budget import Budget
from .capture import Captured, capture
from .inputs import InputError, calibration_batches, check_moments
from .pipeline import Output, PipelineState, apply_plan, scope
from .plan import Plan
from .planning import collect_input_moments, collect_sensitivity
from .policies import Policy, load_policy
from .scale.stream import compile_streamed

PolicyLike = Policy | str | Path | Mapping[str, Any]


@dataclass
class CompileReport:
    """What `compile` did: the plan and the seconds each stage took."""

    plan: Plan
    seconds: dict[str, float] = field(default_factory=dict)
    output: str = "module"

    def __str__(self) -> str:
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        return f"{self.plan.table()}\n\noutput: {self.output}; time: {stages}"


@overload
def compile(  # noqa: A001
    model: nn.Module, budget: str | float | Budget | None = None, *, policy: PolicyLike | None = None,
    example_inputs: Any = None, calibration: Iterable[Any] | None = None, output: Output = "auto",
    inplace: bool = False, progress: bool = False, report: Literal[False] = False, stream: Literal[False] = False,
) -> nn.Module: ...


@overload
def compile(  # noqa: A001
    model: nn.Module, budget: str | float | Budget | None = None, *, policy: PolicyLike | None = None,
    example_inputs: Any = None, calibration: Iterable[Any] | None = None, output: Output = "auto",
    inplace: bool = False, progress: bool = False, report: Literal[True], stream: Literal[False] = False,
) -> tuple[nn.Module, CompileReport]: ...


@overload
def compile(  # noqa: A001
    model: str | Path, budget: str | float | Budget | None = None, *, policy: PolicyLike | None = None,
    calibration: Iterable[Any] | None = None, progress: bool = False, report: Literal[False] = False,
    stream: Literal[True], out: str | Path, max_memory: str | int | None = None,
    offload_activations: str | Path | None = None,
) -> Path: ...


@overload
def compile(  # noqa: A001
    model: str | Path, budget: str | float | Budget | None = None, *, policy: PolicyLike | None = None,
    calibration: Iterable[Any] | None = None, progress: bool = False, report: Literal[True],
    stream: Literal[True], out: str | Path, max_memory: str | int | None = None,
    offload_activations: str | Path | None = None,
) -> tuple[Path, CompileReport]: ...


def compile(  # noqa: A001 - mirrors torch.compile on purpose
    model: nn.Module | str | Path,
    budget: str | float | Budget | None = None,
    *,
    policy: PolicyLike | None = None,
    example_inputs: Any = None,
    calibration: Iterable[Any] | None = None,
    output: Output = "auto",
    inplace: bool = False,
    progress: bool = False,
    report: bool = False,
    stream: bool = False,
    out: str | Path | None = None,
    max_memory: str | int | None = None,
    offload_activations: str | Path | None = None,
) -> nn.Module | Path | tuple[nn.Module | Path, CompileReport]:
    """Compress ``model`` so its in-scope weights shrink by ``budget``; the original is left untouched.

    ``budget`` (``"25x"``, ``"40MB"``, ``"3M params"``) overrides the policy's. ``policy`` is a
    `Policy`, a file, or the name of a shipped policy (``"edge-25x"``); by default every linear
    and LSTM weight is in scope and may use every format. ``calibration`` is an iterable of model
    inputs (tensors, tuples or dicts) for data-aware planning (it makes the objective ``data``):
    input moments from every batch, sensitivity from the first ``solver.sensitivity_batches``. ``output="module"`` returns the
    same class with compressed modules swapped in (Hugging Face models keep ``generate()``);
    ``"graph"`` returns the rewritten fx graph; ``"auto"`` picks module when every site allows it.
    With ``report=True`` returns ``(model, CompileReport)``.

    ``stream=True`` compresses a model larger than memory: ``model`` is then a Hugging Face folder
    (config.json + safetensors shards), compressed one block at a time and saved to ``out`` (returned,
    loadable with `kronc.load`); ``max_memory`` (``"2GB"``) refuses to start when the estimated peak
    exceeds it and ``offload_activations`` keeps cached activations in that folder (`kronc.scale.stream`).
    """
    if stream:
        return _compile_streamed(model, budget, policy, calibration, out, max_memory, offload_activations, progress, report)
    seconds: dict[str, float] = {}
    t0 = t = time.perf_counter()
    pol = make_policy(policy, budget, calibration)  # 0. the policy: a file, a shipped name or an object; budget overrides
    if not isinstance(model, nn.Module):
        raise InputError(f"kronc.compile takes an nn.Module (or a Hugging Face folder with stream=True), got "
                         f"{type(model).__name__}")
    state = PipelineState.start(model, pol, example_inputs, progress=progress)  # 1. trace the model, resolve the scope
    seconds["capture"], t = time.perf_counter() - t, time.perf_counter()
    state.calibrate(calibration)  # 2. input moments and sensitivity (data objective only)
    seconds["calibrate"], t = time.perf_counter() - t, time.perf_counter()
    the_plan = state.make_plan()  # 3. analyse, solve
    seconds["plan"], t = time.perf_counter() - t, time.perf_counter()
    small = state.apply(output, inplace=inplace)  # 4. fit, materialize
    seconds["apply"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    # nn.Module.__setattr__ is typed for tensors and modules only
    small.kronc_policy = pol.model_dump(mode="json")  # type: ignore[assignment]
    if report:
        kind = "graph" if isinstance(small, torch.fx.GraphModule) and not isinstance(model, torch.fx.GraphModule) else "module"
        return small, CompileReport(the_plan, seconds, kind)
    return small


def _compile_streamed(model: Any, budget: str | float | Budget | None, policy: PolicyLike | None, calibration: Any,
                      out: str | Path | None, max_memory: str | int | None, offload: str | Path | None, progress: bool,
                      report: bool) -> Path | tuple[Path, CompileReport]:
    """`compile(stream=True)`: the policy as for an in-memory compile, then `kronc.scale.stream`."""
    if not isinstance(model, (str, Path)):
        raise InputError(f"stream=True compresses a Hugging Face folder given by its path, got a {type(model).__name__}")
    if out is None:
        raise InputError("stream=True writes the compressed model to a folder: pass out='my-small-model'")
    pol = make_policy(policy, budget, calibration)
    result = compile_streamed(model, pol, out, calibration=calibration, max_memory=max_memory,
                              offload_activations=offload, progress=progress)
    return (result.path, CompileReport(result.plan, result.seconds, "save folder")) if report else result.path


def plan(
    model: nn.Module | Captured,
    policy: PolicyLike | None = None,
    *,
    budget: str | float | Budget | None = None,
    calibration: Iterable[Any] | None = None,
    example_inputs: Any = None,
    progress: bool = False,
    moments: Mapping[str, Tensor] | None = None,
    importance: Mapping[str, float] | None = None,
) -> Plan:
    """Choose a format for every in-scope site of ``model`` (no weights are changed).

    ``moments`` are input moments already collected by `input_moments` (then ``calibration`` is
    not run again); pass the same to `apply` so low-rank fits are the data-aware ones planned.
    ``importance`` is a per-site sensitivity from `sensitivity` (computed here from
    ``calibration`` when the moments are too and the policy asks for it).
    """
    pol = make_policy(policy, budget, calibration if moments is None else moments)
    state = PipelineState.start(model, pol, example_inputs, progress=progress)
    if moments is None:
        state.calibrate(calibration)
        if importance is not None:
            state.importance = importance
    else:
        state.moments, state.importance = moments, importance
    return state.make_plan()


def input_moments(
    captured: Captured,
    policy: PolicyLike,
    calibration: Iterable[Any] | None,
    *,
    progress: bool = False,
) -> dict[str, Tensor] | None:
    """Input second moments of the in-scope sites over ``calibration``, when the policy's objective is
    ``data`` (else None): what both `plan` and `apply` need for data-aware compression."""
    pol = load_policy(policy) if not isinstance(policy, Policy) else policy  # type: ignore[arg-type]
    if calibration is None or pol.objective != "data":
        return None
    calibration = calibration_batches(captured.model, calibration)
    moments = collect_input_moments(captured.model, scope(captured, pol, warn=False)[1], calibration, progress=progress)
    check_moments(moments)
    return moments


def sensitivity(
    captured: Captured,
    policy: PolicyLike,
    calibration: Iterable[Any] | None,
    *,
    progress: bool = False,
) -> dict[str, float] | None:
    """Per-site sensitivity (`kronc.planning.collect_sensitivity`) over the first calibration batches,
    when the policy's objective is ``data`` and its ``solver.sensitivity`` is ``fisher`` (else None)."""
    pol = load_policy(policy) if not isinstance(policy, Policy) else policy  # type: ignore[arg-type]
    if calibration is None or pol.objective != "data" or pol.solver.sensitivity == "none":
        return None
    sites = scope(captured, pol, warn=False)[1]
    calibration = calibration_batches(captured.model, calibration)
    found = collect_sensitivity(captured.model, sites, calibration, max_batches=pol.solver.sensitivity_batches, progress=progress)
    return found or None


def apply(
    model: nn.Module | Captured,
    plan: Plan | str | Path,
    *,
    output: Output = "auto",
    inplace: bool = False,
    example_inputs: Any = None,
    moments: Mapping[str, Tensor] | None = None,
    progress: bool = False,
) -> nn.Module:
    """Fit and install the formats of ``plan`` (a `Plan` or a saved plan file) without searching again.

    ``moments`` (input second moments per site, from calibration) make the fits data-aware (whitened
    SVD for low-rank, Wanda-ranked entries and blocks for the sparse formats).
    """
    the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    captured = model if isinstance(model, Captured) else capture(model, example_inputs)
    return apply_plan(captured, the_plan, output=output, inplace=inplace, moments=moments, progress=progress)


def make_policy(policy: PolicyLike | None, budget: str | float | Budget | None, calibration: Any = None) -> Policy:
    """The policy, ``budget`` overriding its own; calibration data turns the ``weight`` objective into
    ``data`` (as the command line does), since it would otherwise go unused."""
    if policy is not None and not isinstance(policy, (Policy, str, Path, Mapping)):
        raise InputError(f"policy must be a Policy, a policy file, a shipped policy name or a dict, got "
                         f"{type(policy).__name__} {policy!r}"[:200])
    if policy is None:
        if budget is None:
            raise ValueError("kronc needs a budget (e.g. budget='10x') or a policy (e.g. policy='edge-25x')")
        pol = Policy(budget=Budget.parse(budget))
    else:
        pol = load_policy(policy)  # type: ignore[arg-type]
    if budget is not None:
        pol = pol.model_copy(update={"budget": Budget.parse(budget)})
    if calibration is not None and pol.objective == "weight":
        pol = pol.data_aware()
    return pol
