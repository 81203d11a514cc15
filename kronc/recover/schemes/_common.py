"""Shared plumbing of the training schemes: finding what they act on, argument checks, plan updates.

Schemes act on two kinds of weights:

* **compressed** ones, the `Factorized` formats inside `CompressedLinear`/`CompressedEmbedding`/
  `CompressedLSTM` modules (found by walking the model's modules; a format shared by tied sites is
  found once);
* **dense** ones, the weights of ``nn.Linear`` and Hugging Face GPT-2 ``Conv1D`` modules, seen in
  their logical ``(out, in)`` orientation (`DenseTarget`; a ``Conv1D`` stores ``(in, out)``).

When a scheme changes a compressed model's stored structure (a repacked overlay, a new low-rank
layer), the model's ``kronc_plan`` is updated to match, so `kronc.save`/`kronc.load` keep working.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...formats import Dense, Factorized, FormatSpec
from ...modules import CompressedEmbedding, CompressedLinear, CompressedLSTM
from ...passes.replacements import replacement_for_module
from ...passes.swap import set_submodule
from ...plan import Decision, Plan
from ...sites import is_hf_conv1d

# --------------------------------------------------------------------------- argument checks


def check_fraction(scheme: str, name: str, value: float, *, low_open: bool = True, high_open: bool = False) -> float:
    """``value`` as a float inside ``(0, 1]`` (or the interval the flags say); else a ValueError naming it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{scheme}: {name} must be a number, got {value!r}") from None
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v < 1 if high_open else v <= 1
    if not (lo_ok and hi_ok and math.isfinite(v)):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{scheme}: {name} must be in {interval}, got {value!r}")
    return v


def check_positive(scheme: str, name: str, value: float, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{scheme}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{scheme}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def check_steps(scheme: str, total_steps: int) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"{scheme}: total_steps must be a positive integer, got {total_steps!r}")
    return total_steps


def check_block(scheme: str, block: Any) -> tuple[int, int]:
    try:
        bo, bi = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"{scheme}: block must be a pair (rows, cols), got {block!r}") from None
    if bo < 1 or bi < 1:
        raise ValueError(f"{scheme}: block must be positive (rows, cols), got {block!r}")
    return bo, bi


# --------------------------------------------------------------------------- compressed formats


def compressed_formats(model: nn.Module) -> Iterator[tuple[str, Factorized]]:
    """Every `Factorized` weight of ``model`` with the qualified name of its module, each object once."""
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, Factorized) and id(mod) not in seen:
            seen.add(id(mod))
            yield name, mod


def census(model: nn.Module) -> str:
    """What a scheme could find in ``model``, for error messages: ``lowrank x 4, dense linear x 2``."""
    counts: Counter[str] = Counter(fmt.spec.kind for _, fmt in compressed_formats(model))
    for _, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            counts["dense linear"] += 1
        elif is_hf_conv1d(mod):
            counts["dense Conv1D"] += 1
    if not counts:
        return "nothing compressible"
    return ", ".join(f"{k} x {n}" for k, n in sorted(counts.items()))


def format_sites(model: nn.Module) -> dict[int, list[str]]:
    """``id(format)`` -> the plan site names it stores (from the model's ``kronc_plan``), where it can tell.

    Module-level models keep the site's owner path (``layers.0.fc`` for ``layers.0.fc.weight``);
    graph rewrites name their modules ``kronc_<owner with _>_<i>`` or keep the ``call_module`` target.
    """
    plan = getattr(model, "kronc_plan", None)
    if plan is None:
        return {}
    modules = dict(model.named_modules())
    out: dict[int, list[str]] = {}
    for d in plan.decisions:
        owner, _, attr = d.site.rpartition(".")
        fmts: list[Factorized] = []
        mod = modules.get(owner)
        if isinstance(mod, (CompressedLinear, CompressedEmbedding)):
            fmts.append(mod.weight_format)
        elif isinstance(mod, CompressedLSTM) and (m := re.fullmatch(r"weight_(ih|hh)_l(\d+)", attr)):
            store = mod.ih if m.group(1) == "ih" else mod.hh
            fmts.append(store[int(m.group(2))])  # type: ignore[arg-type]
        else:
            prefix = "kronc_" + (owner or d.site).replace(".", "_") + "_"
            fmts += [
                m.weight_format for n, m in modules.items()
                if n.startswith(prefix) and n[len(prefix):].isdigit() and isinstance(m, (CompressedLinear, CompressedEmbedding))
            ]
        for fmt in fmts:
            sites = out.setdefault(id(fmt), [])
            if d.site not in sites:
                sites.append(d.site)
    return out


def update_plan(model: nn.Module, site: str, shape: tuple[int, int], spec: FormatSpec, itemsize: int) -> None:
    """Record ``spec`` for ``site`` in the model's ``kronc_plan`` (adding the decision, or a plan, if missing).

    An existing decision keeps its rule and loses its error estimate (made for the weights before
    training); a new one is marked ``rule="recover"``.
    """
    plan = getattr(model, "kronc_plan", None)
    if plan is None:
        plan = Plan(decisions=[])
    shape = (int(shape[0]), int(shape[1]))
    fields: dict[str, Any] = {"spec": spec, "bytes_after": spec.nbytes(shape, itemsize), "params_after": spec.nparams(shape)}
    decisions = list(plan.decisions)
    at = next((i for i, d in enumerate(decisions) if d.site == site), None)
    if at is None:
        decisions.append(Decision(site=site, shape=shape, bytes_before=shape[0] * shape[1] * itemsize, rule="recover",
                                  **fields))
    else:
        decisions[at] = decisions[at].model_copy(update={**fields, "error": None})
    model.kronc_plan = plan.model_copy(update={"decisions": decisions})  # type: ignore[assignment]


# --------------------------------------------------------------------------- dense weights


@dataclass
class DenseTarget:
    """A dense ``nn.Linear`` / ``Conv1D`` weight in its logical ``(out, in)`` orientation."""

    name: str
    module: nn.Module
    transposed: bool  # a Conv1D stores (in, out)

    @property
    def param(self) -> nn.Parameter:
        return self.module.weight  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int]:
        s = self.param.shape
        return (int(s[1]), int(s[0])) if self.transposed else (int(s[0]), int(s[1]))

    def weight(self) -> Tensor:
        """The logical weight (a view of the parameter: differentiable, and in-place edits of ``.data`` stick)."""
        return self.param.T if self.transposed else self.param

    def data(self) -> Tensor:
        return self.param.data.T if self.transposed else self.param.data

    def grad(self) -> Tensor | None:
        g = self.param.grad
        return None if g is None else (g.T if self.transposed else g)

    @property
    def site(self) -> str:
        return f"{self.name}.weight"


def dense_targets(model: nn.Module, include: str | None = None, exclude: str | None = None) -> list[DenseTarget]:
    """Every dense ``nn.Linear`` and Hugging Face ``Conv1D`` whose qualified name matches ``include``
    (a regex searched in the name; all when None) and not ``exclude``; a shared module once."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    out: list[DenseTarget] = []
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) or is_hf_conv1d(mod)) or id(mod) in seen:
            continue
        if not isinstance(getattr(mod, "weight", None), nn.Parameter):
            continue
        if (inc and not inc.search(name)) or (exc and exc.search(name)):
            continue
        seen.add(id(mod))
        out.append(DenseTarget(name, mod, transposed=not isinstance(mod, nn.Linear)))
    return out


def shared_weight(model: nn.Module, target: DenseTarget) -> bool:
    """True when the target's weight is also used under another name (e.g. a head tied to the embedding)."""
    p = target.param
    return sum(1 for _, q in model.named_parameters(remove_duplicate=False) if q is p) > 1


def describe_filter(include: str | None, exclude: str | None) -> str:
    parts = ([f"include={include!r}"] if include else []) + ([f"exclude={exclude!r}"] if exclude else [])
    return f" matching {', '.join(parts)}" if parts else ""


def swap_in(model: nn.Module, target: DenseTarget, fmt: Factorized) -> nn.Module:
    """Replace the target's module by a `CompressedLinear` holding ``fmt`` (bias kept); returns the new module."""
    if isinstance(fmt, Dense):
        raise ValueError("swap_in expects a compressed format, not Dense")
    new = replacement_for_module(target.module, "linear", {"weight": fmt})
    set_submodule(model, target.name, new)
    update_plan(model, target.site, target.shape, fmt.spec, target.param.element_size())
    return new


# --------------------------------------------------------------------------- state helpers


def match_names(scheme: str, expected: list[str], got: list[str]) -> None:
    if expected != got:
        raise ValueError(
            f"{scheme}: the saved state is for {len(got)} weights ({', '.join(got[:4])}{', ...' if len(got) > 4 else ''}) "
            f"but this model has {len(expected)} ({', '.join(expected[:4])}{', ...' if len(expected) > 4 else ''})"
        )


def topk_mask(scores: Tensor, keep: int, within: Tensor | None = None) -> Tensor:
    """Boolean mask of the ``keep`` highest ``scores`` (restricted to ``within``; ties by position)."""
    flat = scores.detach().flatten().to(torch.float64)
    if within is not None:
        flat = torch.where(within.flatten(), flat, torch.full_like(flat, -math.inf))
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    mask[order[:keep]] = True
    return mask.reshape(scores.shape)
