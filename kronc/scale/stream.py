"""Streamed compile: a Hugging Face checkpoint compressed one block at a time, never loaded whole.

The stages are those of `kronc.compile`, run per block (the weights of one block in memory at a time,
its calibration inputs the outputs of the block before it, as in llm-compressor's sequential pipeline
and GPTQ's layer loop)::

    skeleton = build(folder)            # meta-device model, traced sites, the block list, shard headers checked
    pass 1  (blocks 0..L-1, then rest)  # load, run calibration, input moments, error curves per site; drop
    pass 1b (rest, then blocks L-1..0)  # sensitivity: the loss gradient swept back block by block (data + fisher)
    solve                               # the same knapsack over every site's curve: the in-memory plan
    pass 2  (blocks 0..L-1, then rest)  # load, moments again, fit the planned formats, write the block's shard

Each number goes through the same functions as the in-memory pipeline (`collect_input_moments`,
`site_curve`, `damage_table`, `plan_from_tables`, `fit_site`, `materialize`), on the same inputs, so
the plan is the same and the fitted weights are bit-identical. The output is an ordinary kronc save
folder with one weight shard per block (`kronc.load` reads it).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..formats import Factorized, FormatSpec
from ..inputs import InputError, calibration_batches, check_finite_weights, check_moments
from ..passes.swap import swappable
from ..pipeline import materialize, scope
from ..plan import Plan
from ..planning import SearchOptions, collect_input_moments, fit_site
from ..planning.calibrate import fisher_loss
from ..planning.planner import (
    SiteCurve,
    budget_limit,
    damage_table,
    map_sites,
    plan_from_tables,
    price_sites,
    site_curve,
    site_energy,
    white_energy,
)
from ..policies import Policy
from ..sites import Site
from . import distributed as dist
from .activations import Activations
from .memory import Estimate, estimate, parse_memory
from .runner import BlockView, run_block, run_tail, stream_of, unit_grads
from .save import SaveWriter
from .skeleton import Skeleton, build, load_unit, release_memory, unit_names, unload_unit


@dataclass
class StreamResult:
    """What a streamed compile did: the plan, the save folder, the memory estimate and seconds per pass."""

    plan: Plan
    path: Path
    estimate: Estimate
    seconds: dict[str, float] = field(default_factory=dict)
    importance: dict[str, float] | None = None
    """Per-site sensitivity measured by the backward sweep (None without it)."""


def compile_streamed(
    folder: str | Path,
    policy: Policy,
    out: str | Path,
    *,
    calibration: Iterable[Any] | None = None,
    max_memory: str | int | None = None,
    offload_activations: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> StreamResult:
    """Compress the Hugging Face model in ``folder`` block by block and save it to ``out`` (see the module
    docstring). Everything that can be checked is checked before the first block is loaded: the folder,
    its shards against the config, the policy's scope, the budget's reachability, ``out``, and the memory
    estimate against ``max_memory``. Under an initialised ``torch.distributed`` process group the sites
    and blocks are split across ranks (`kronc.scale.distributed`)."""
    try:
        return _compile(folder, policy, out, calibration=calibration, max_memory=max_memory,
                        offload_activations=offload_activations, overwrite=overwrite, progress=progress, log=log)
    except BaseException as e:
        dist.fail(e)  # the other ranks stop with this error instead of waiting for this rank
        raise


def _compile(folder: str | Path, policy: Policy, out: str | Path, *, calibration: Iterable[Any] | None,
             max_memory: str | int | None, offload_activations: str | Path | None, overwrite: bool, progress: bool,
             log: Callable[[str], None]) -> StreamResult:
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    limit = parse_memory(max_memory) if max_memory is not None else None
    sk = build(folder)  # 1. skeleton on meta, sites, blocks, shard headers checked
    resolution, in_scope = scope(sk.captured, policy)  # 2. the policy's scope (resolved as in memory)
    fixed = [r.site.name for r in resolution.sites if r.fixed is not None]
    if fixed:
        raise InputError(f"policy.fixed stores {fixed[0]} at a fixed precision: streamed compile does not support fixed "
                         "entries yet; compile in memory or drop policy.fixed")
    units = _units(sk, in_scope)
    options = SearchOptions()
    spaces = {s.name: list(resolution[s.name].formats) for s in in_scope}
    rules = {s.name: resolution[s.name].rule for s in in_scope}
    priced = price_sites(in_scope, spaces, options)
    budget = policy.budget
    key, cap = budget_limit(in_scope, priced, budget)  # 3. a budget no plan reaches fails here, before any work
    stuck = [s.name for s in in_scope if not swappable(s)]
    if stuck:
        raise InputError(f"site {stuck[0]} is used through F.linear: streamed compile writes module saves only; "
                         "exclude it in the policy's scope")
    SaveWriter.check(out, overwrite=overwrite)  # 4. --out checked before any work
    batches = None
    if calibration is not None and policy.objective == "data":
        batches = calibration_batches(sk.model, calibration)
    fisher = batches is not None and policy.solver.sensitivity != "none"
    n_fisher = min(policy.solver.sensitivity_batches, len(batches)) if fisher and batches else 0
    est = _estimate(sk, units, priced, batches, n_fisher, offload_activations is not None, options)
    if dist.rank() == 0:
        log(est.describe())
    est.check(limit)  # 5. refuse to start when the estimate exceeds --max-memory
    writer = SaveWriter.prepare(out)
    acts = Activations(offload_activations)
    try:
        load_unit(sk, None)  # the rest (embeddings, norm, head) stays loaded: every call runs the embeddings
        t = time.perf_counter()
        curves, energies, data = _pass1(sk, units, priced, batches, acts, n_fisher, options, progress)
        seconds["analyse"], t = time.perf_counter() - t, time.perf_counter()
        importance = _sensitivity(sk, units, batches, acts, n_fisher) if n_fisher else None
        seconds["sensitivity"], t = time.perf_counter() - t, time.perf_counter()
        given = [float(v) for k, v in (importance or {}).items() if k in spaces]
        typical = float(np.median(given)) if given else 1.0
        white = white_energy(list(energies.values()))
        tables = [
            damage_table(priced[s.name], curves[s.name], white if data and s.name not in energies else 1.0,
                         float(importance.get(s.name, typical)) if importance else 1.0)
            for s in in_scope
        ]
        plan = plan_from_tables(in_scope, tables, budget, key, cap, data=data, rules=rules, options=options)
        seconds["solve"], t = time.perf_counter() - t, time.perf_counter()
        _pass2(sk, units, plan, batches if data else None, acts, writer, progress)
        seconds["fit"], t = time.perf_counter() - t, time.perf_counter()
        path = writer.finish(sk.model, plan, policy.model_dump(mode="json"), Path(folder))
        seconds["write"] = time.perf_counter() - t
    except BaseException:
        writer.abort()
        raise
    finally:
        acts.close()
    seconds["total"] = time.perf_counter() - t0
    return StreamResult(plan, path, est, seconds, importance)


def _units(sk: Skeleton, in_scope: Sequence[Site]) -> dict[int | None, list[Site]]:
    """In-scope sites per block (None: the rest); a tied site across units is refused."""
    units: dict[int | None, list[Site]] = {}
    for s in in_scope:
        where = {sk.unit_of(n) for n in (s.name, *s.aliases)}
        if len(where) > 1:
            raise InputError(f"site {s.name} is tied across blocks ({', '.join(s.aliases)}): streamed compile cannot split it")
        units.setdefault(where.pop(), []).append(s)
    return units


def _estimate(sk: Skeleton, units: dict[int | None, list[Site]], priced: dict[str, list[Any]], batches: list[Any] | None,
              n_fisher: int, offload: bool, options: SearchOptions) -> Estimate:
    config = sk.model.config
    width = int(getattr(config, "hidden_size", 0) or 0)
    inner = int(getattr(config, "intermediate_size", 0) or 4 * width)
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    rows = [_rows(b) for b in batches] if batches else []
    seq = max((_seq(b) for b in batches), default=0) if batches else 0
    per_batch = max(rows, default=0) * (3 * inner + 4 * width) * 4 + heads * seq * seq * 4 * (max(rows, default=0) // max(seq, 1))
    per_batch *= 3 if n_fisher else 1  # activations kept for the backward sweep
    block = max((sk.checkpoint.nbytes(unit_names(sk, i)) for i in range(sk.count)), default=0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    per_batch = max(per_batch, max(rows, default=0) * vocab * 4 * (4 if n_fisher else 1))  # logits, softmax, gradients
    widest = max((s.shape[1] for sites in units.values() for s in sites), default=0)
    analysis = options.worker_count() * 6 * 8 * widest**2 if batches else options.worker_count() * 3 * block
    stats = 0
    if batches:
        stats = max((sum(32 * s.shape[1] ** 2 for s in sites if s.kind in ("linear", "conv1d"))
                     for sites in units.values()), default=0)
    return estimate(
        rest=sk.checkpoint.nbytes(unit_names(sk, None)), block=block, stats=stats, stream_rows=rows, width=width,
        sensitivity_rows=sum(rows[:n_fisher]), blocks=sk.count, offload=offload,
        work=per_batch, analysis=analysis, curves=sum(len(c) for c in priced.values()) * 200,
    )


def _rows(batch: Any) -> int:
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(ids.numel()) if isinstance(ids, Tensor) else 0


def _seq(batch: Any) -> int:
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(ids.shape[-1]) if isinstance(ids, Tensor) and ids.dim() else 0


def _moments(sk: Skeleton, sites: Sequence[Site], batches: list[Any], step: Callable[[int], Any]) -> Any:
    """Input moments of ``sites`` over every batch, ``step(k)`` running the unit on batch ``k`` (kronc's own
    calibration code, hooked on the skeleton's modules)."""
    moments = collect_input_moments(BlockView(sk, step), sites, range(len(batches)), progress=False)
    check_moments(moments)
    return moments


def _block_step(sk: Skeleton, i: int, batches: list[Any], acts: Activations, n_fisher: int) -> Callable[[int], Any]:
    def step(k: int) -> Any:
        previous = acts.get(k) if i else None
        if i and k < n_fisher:
            acts.put(("fisher", i, k), stream_of(previous))
        out = run_block(sk, i, batches[k], previous)
        acts.put(k, out)
        return out

    return step


def _tail_step(sk: Skeleton, batches: list[Any], acts: Activations, n_fisher: int) -> Callable[[int], Any]:
    def step(k: int) -> Any:
        if k < n_fisher:
            acts.put(("fisher", None, k), stream_of(acts.get(k)))
        return run_tail(sk, batches[k], acts.get(k))

    return step


def _pass1(sk: Skeleton, units: dict[int | None, list[Site]], priced: dict[str, list[Any]], batches: list[Any] | None,
           acts: Activations, n_fisher: int, options: SearchOptions, progress: bool
           ) -> tuple[dict[str, SiteCurve], dict[str, float], bool]:
    """Every in-scope site's error curve (and, with calibration, the energy of its input moments)."""
    curves: dict[str, SiteCurve] = {}
    energies: dict[str, float] = {}
    data = False
    order: list[int | None] = [*range(sk.count), None]
    for unit in order:
        sites = units.get(unit, [])
        if unit is not None:
            load_unit(sk, unit)
        check_finite_weights(sites, sk.captured.weight)
        moments: Any = {}
        if batches is not None:
            step = _tail_step(sk, batches, acts, n_fisher) if unit is None else _block_step(sk, unit, batches, acts, n_fisher)
            moments = _moments(sk, sites, batches, step)
        data = data or any(s.name in moments for s in sites)
        folds = getattr(moments, "folds", None) or {}
        mine = dist.my_share(sites)

        def analyse(site: Site, moments: Any = moments, folds: Any = folds) -> SiteCurve:
            return site_curve(sk.captured.weight(site), moments.get(site.name), priced[site.name], options, folds.get(site.name))

        found = map_sites(analyse, mine, options.worker_count(), f"kronc stream: block {unit}", progress)
        curves.update(dist.gather_dict(dict(zip([s.name for s in mine], found, strict=True))))
        energies.update({s.name: site_energy(moments[s.name], options.damping) for s in sites if s.name in moments})
        if unit is not None:
            unload_unit(sk, unit)
    return curves, energies, data


def _sensitivity(sk: Skeleton, units: dict[int | None, list[Site]], batches: list[Any] | None, acts: Activations,
                 n_fisher: int) -> dict[str, float] | None:
    """`collect_sensitivity`'s numbers, swept back from the loss block by block (the stream inputs of every block
    for the first ``n_fisher`` batches were cached in pass 1)."""
    assert batches is not None
    generator = torch.Generator().manual_seed(0)
    sums: dict[str, float] = {}
    rows: dict[str, int] = {}
    grads: list[Tensor] = []

    def owners(sites: Sequence[Site]) -> list[str]:
        return list(dict.fromkeys(s.owner for s in sites if s.kind in ("linear", "conv1d")))

    def add(found: dict[str, list[Tensor]]) -> None:
        for owner, gs in found.items():
            for g in gs:
                sums[owner] = sums.get(owner, 0.0) + float(g.detach().float().square().sum(dtype=torch.float64))
                rows[owner] = rows.get(owner, 0) + g.numel() // g.shape[-1]

    rest = owners(units.get(None, []))
    for k in range(n_fisher):
        found, g = unit_grads(sk, None, batches[k], acts.get(("fisher", None, k)), None, rest,
                              loss=lambda out, b: fisher_loss(out, b, generator))
        add(found)
        grads.append(g)
    for i in reversed(range(sk.count)):
        load_unit(sk, i)
        for k in range(n_fisher):
            x = acts.get(("fisher", i, k)) if i else torch.zeros(())
            found, grads[k] = unit_grads(sk, i, batches[k], x, grads[k], owners(units.get(i, [])))
            add(found)
            acts.drop(("fisher", i, k))
        unload_unit(sk, i)
    out = {}
    for sites in units.values():
        for s in sites:
            if s.kind in ("linear", "conv1d") and rows.get(s.owner):
                kappa = sums[s.owner] / (rows[s.owner] * s.shape[0])
                if np.isfinite(kappa):
                    out[s.name] = kappa
    return out or None


def _pass2(sk: Skeleton, units: dict[int | None, list[Site]], plan: Plan, batches: list[Any] | None, acts: Activations,
           writer: SaveWriter, progress: bool) -> None:
    """Fit the planned formats block by block (moments recomputed from the same inputs as in pass 1) and write
    each block's compressed tensors to its own shard; this rank fits and writes its blocks only."""
    count = sk.count
    order: list[int | None] = [*range(count), None]
    for unit in order:
        sites = units.get(unit, [])
        mine = dist.owns(unit, count)
        if not mine and batches is None:
            continue  # no calibration: a block another rank writes needs nothing from this one
        pristine = copy.deepcopy(sk.blocks[unit]) if unit is not None else None
        if unit is not None:
            load_unit(sk, unit)
        moments: Any = {}
        if batches is not None:  # every rank runs the block (the next needs its outputs); moments only where it is fitted
            step = _tail_step(sk, batches, acts, 0) if unit is None else _block_step(sk, unit, batches, acts, 0)
            moments = _moments(sk, sites if mine else [], batches, step)
        if mine:
            decisions = [d for d in plan.decisions if sk.unit_of(d.site) == unit]
            part = Plan(decisions=decisions, budget=plan.budget, objective=plan.objective)
            by_name = {s.name: s for s in sites}

            def fit(site: Site, spec: FormatSpec, m: Any = moments) -> Factorized:
                return fit_site(sk.captured.weight(site), spec, m.get(site.name))

            materialize(part, by_name, fit, model=sk.model)
            writer.write_unit(sk, unit)
        if unit is not None and pristine is not None:
            sk.blocks[unit] = pristine
            release_memory()
        if progress:
            print(f"kronc stream: wrote {'rest' if unit is None else f'block {unit}'}", flush=True)
