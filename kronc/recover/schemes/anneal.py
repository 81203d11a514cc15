"""Overlay density annealing for doped weights (doped Kronecker, Thakker et al.).

The doped papers train with a denser sparse overlay than the one they deploy and anneal it down:
the overlay's share of the weight is gradually pruned away while the structured base learns to
carry what it held. Here:

* `attach` finds every `Doped` weight and keeps a boolean mask over its overlay's stored values
  (all kept at first);
* before each step the scheduled entry count is computed per overlay, moving from its start count
  (the overlay as fitted, or ``start_density``) to the target count (``count_kept(target_density,
  out * in)``, the count a `DopedSpec` of that density stores) by ``linear`` or ``cosine`` schedule,
  reached at step ``round(end_fraction * total_steps)`` and held after. When the count drops, the
  kept entries with the smallest ``|value|`` are masked; a masked entry never comes back;
* masked values are zeroed before every step and after the optimizer step, and their gradients are
  zeroed after backward, so neither the gradient nor momentum moves them;
* `finish` prunes to the exact target count, then **repacks** each overlay to its kept entries
  only (a new `SparseIndex`/`SparseOverlay` with the smaller ``nnz``, in the smaller encoding for
  it) and sets the `Doped`'s spec density to the target, so ``doped.nbytes()`` equals
  ``doped.spec.nbytes(shape, itemsize)``, and the model's ``kronc_plan`` decision to match
  (`kronc.save`/`kronc.load` stay consistent).

To *start* denser, compile with a denser plan: `denser_plan` multiplies the density of every doped
decision of a plan, and `OverlayAnnealing(target_density=plan)` anneals each overlay back to the
density the original plan gave its site::

    plan = kronc.plan(model, budget="25x")
    student = kronc.apply(model, denser_plan(plan, 4))
    recover(student, teacher, data, schemes=[OverlayAnnealing(target_density=plan)])

Parameters replaced by `finish` (each overlay's ``values``) are new ``nn.Parameter`` objects: an
optimizer built before `finish` does not see them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...formats import Doped, SparseIndex, SparseOverlay
from ...formats.sparse_index import count_kept
from ...plan import Decision, Plan
from ._common import (
    census,
    check_fraction,
    check_positive,
    check_steps,
    compressed_formats,
    format_sites,
    match_names,
    topk_mask,
    update_plan,
)
from .base import Scheme

Schedule = Literal["linear", "cosine"]


@dataclass
class _Overlay:
    name: str
    doped: Doped
    total: int  # out * in: densities are fractions of the weight's entries
    start: int
    target: int
    target_density: float
    mask: Tensor  # bool over the overlay's stored values


class OverlayAnnealing(Scheme):
    """Anneal every doped overlay from its start density to ``target_density``; repack in `finish`.

    ``target_density`` is one density for every overlay (in ``(0, 1]``), or a `Plan` whose doped
    decisions give each site its own (the plan the denser one was made from; needs the model's
    ``kronc_plan`` to tell which overlay is which site). ``start_density=None`` starts from each
    overlay as fitted; a number first prunes each overlay to that density (and fails if one stores
    fewer entries).
    """

    name = "overlay_annealing"

    def __init__(
        self,
        target_density: float | Plan,
        start_density: float | None = None,
        schedule: Schedule = "linear",
        end_fraction: float = 0.8,
        enabled: bool = True,
    ) -> None:
        scheme = type(self).__name__
        self.target_plan = target_density if isinstance(target_density, Plan) else None
        self.target_density = None if isinstance(target_density, Plan) else check_fraction(scheme, "target_density", target_density)
        self.start_density = None if start_density is None else check_fraction(scheme, "start_density", start_density)
        if self.start_density is not None and self.target_density is not None and self.start_density < self.target_density:
            raise ValueError(f"{scheme}: start_density={start_density} is below target_density={target_density}")
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"{scheme}: schedule must be 'linear' or 'cosine', got {schedule!r}")
        self.schedule: Schedule = schedule
        self.end_fraction = check_fraction(scheme, "end_fraction", end_fraction)
        self.enabled = bool(enabled)
        self.overlays: list[_Overlay] = []
        self.end_step = 1
        self._pending: dict[str, Any] | None = None

    # ----------------------------------------------------------------- hooks

    def attach(self, model: nn.Module, total_steps: int) -> None:
        if not self.enabled:
            return
        scheme = type(self).__name__
        check_steps(scheme, total_steps)
        doped = [(n, f) for n, f in compressed_formats(model) if isinstance(f, Doped)]
        if not doped:
            raise ValueError(f"{scheme}: no doped weights in the model (found formats: {census(model)})")
        targets = self._target_densities(model, doped)
        self.overlays = []
        for (name, fmt), density in zip(doped, targets, strict=True):
            total = fmt.shape[0] * fmt.shape[1]
            nnz = fmt.overlay.index.nnz
            start = nnz if self.start_density is None else count_kept(self.start_density, total)
            target = count_kept(density, total)
            where = f"{scheme}: the overlay of {name or 'the model'} ({fmt.shape[0]}x{fmt.shape[1]})"
            if start > nnz:
                raise ValueError(f"{where} stores {nnz} entries, fewer than start_density={self.start_density} needs "
                                 f"({start}); compile with a denser plan (see denser_plan)")
            if target > start:
                raise ValueError(f"{where} starts with {start} entries, fewer than target density {density:.4g} keeps "
                                 f"({target}); annealing only removes entries: compile with a denser plan (denser_plan)")
            mask = torch.ones(nnz, dtype=torch.bool, device=fmt.overlay.values.device)
            self.overlays.append(_Overlay(name, fmt, total, start, target, density, mask))
        self.end_step = max(1, round(self.end_fraction * total_steps))
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    def before_step(self, step: int) -> None:
        if not self.enabled:
            return
        for ov in self.overlays:
            keep = self.count(ov, step)
            if keep < int(ov.mask.sum()):
                ov.mask = topk_mask(ov.doped.overlay.values.detach().abs(), keep, within=ov.mask)
            _apply(ov)

    def after_backward(self, step: int) -> None:
        if not self.enabled:
            return
        for ov in self.overlays:
            grad = ov.doped.overlay.values.grad
            if grad is not None:
                grad.mul_(ov.mask.to(grad.dtype))

    def after_step(self, step: int) -> None:
        if not self.enabled:
            return
        for ov in self.overlays:
            _apply(ov)

    def finish(self, model: nn.Module) -> None:
        """Prune every overlay to its exact target count and repack it to the kept entries."""
        if not self.enabled or not self.overlays:
            return
        sites = format_sites(model)
        for ov in self.overlays:
            doped = ov.doped
            values = doped.overlay.values
            ov.mask = topk_mask(values.detach().abs(), ov.target, within=ov.mask)
            rows, cols = doped.overlay.index.decode()
            keep = ov.mask
            index = SparseIndex(doped.shape, rows[keep], cols[keep])
            overlay = SparseOverlay(index, values.detach()[keep].clone())
            overlay.values.requires_grad_(values.requires_grad)
            doped.overlay = overlay
            spec = doped.spec.with_overlay_density(ov.target_density)
            stores = count_kept(ov.target_density, doped.shape[0] * doped.shape[1])  # what the spec's overlay keeps
            if stores != index.nnz:  # pragma: no cover - count_kept defines both
                raise RuntimeError(f"{type(self).__name__}: repacked {index.nnz} entries but the spec stores {stores}")
            doped.spec = spec
            ov.mask = torch.ones(index.nnz, dtype=torch.bool, device=keep.device)
            for site in sites.get(id(doped), []):
                update_plan(model, site, doped.shape, spec, values.element_size())
        self.overlays = []

    # ----------------------------------------------------------------- schedule and reporting

    def count(self, ov: _Overlay, step: int) -> int:
        """Entries the overlay keeps at ``step``: start count at step 0, target count from `end_step` on."""
        frac = min(1.0, max(0, step) / self.end_step)
        done = frac if self.schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * frac))
        return ov.start - round((ov.start - ov.target) * done)

    def density(self) -> float:
        """Kept overlay entries over all doped weights' entries (what the densities are fractions of)."""
        total = sum(ov.total for ov in self.overlays)
        return sum(int(ov.mask.sum()) for ov in self.overlays) / total if total else 0.0

    def metrics(self) -> dict[str, float]:
        if not self.enabled or not self.overlays:
            return {}
        return {"overlay_density": self.density(), "overlay_kept": float(sum(int(ov.mask.sum()) for ov in self.overlays))}

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        return {"names": [ov.name for ov in self.overlays], "masks": [ov.mask.clone() for ov in self.overlays]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.overlays:  # before attach: applied when the overlays are known
            self._pending = dict(state)
            return
        match_names(type(self).__name__, [ov.name for ov in self.overlays], list(state["names"]))
        for ov, mask in zip(self.overlays, state["masks"], strict=True):
            if mask.shape != ov.mask.shape:
                raise ValueError(f"{type(self).__name__}: saved mask for {ov.name} has {mask.numel()} entries, "
                                 f"the overlay stores {ov.mask.numel()}")
            ov.mask = mask.to(device=ov.mask.device, dtype=torch.bool).clone()
            _apply(ov)

    # ----------------------------------------------------------------- targets

    def _target_densities(self, model: nn.Module, doped: list[tuple[str, Doped]]) -> list[float]:
        if self.target_plan is None:
            assert self.target_density is not None
            return [self.target_density] * len(doped)
        scheme = type(self).__name__
        sites = format_sites(model)
        wanted = {d.site: d for d in self.target_plan.decisions}
        out = []
        for name, fmt in doped:
            names = sites.get(id(fmt), [])
            if not names:
                raise ValueError(f"{scheme}: cannot tell which plan site the doped weight {name} is (the model has "
                                 "no kronc_plan naming it); pass one target_density instead")
            decision = wanted.get(names[0])
            density = None if decision is None else decision.spec.overlay_density
            if decision is None or density is None:
                got = "no decision" if decision is None else decision.spec.describe()
                raise ValueError(f"{scheme}: the target plan has {got} for {names[0]}, expected one with a sparse overlay")
            check_fraction(scheme, f"target density of {names[0]}", density)
            out.append(density)
        return out


def _apply(ov: _Overlay) -> None:
    ov.doped.overlay.values.data.mul_(ov.mask.to(ov.doped.overlay.values.dtype))


def denser_plan(plan: Plan, factor: float) -> Plan:
    """``plan`` with every doped decision's overlay density multiplied by ``factor`` (at most 1).

    Apply it (`kronc.apply(model, denser_plan(plan, 4))`) to start training with denser overlays, and
    anneal back with ``OverlayAnnealing(target_density=plan)``.
    """
    factor = check_positive("denser_plan", "factor", factor)
    if factor < 1:
        raise ValueError(f"denser_plan: factor must be at least 1 (it multiplies the density), got {factor}")
    decisions: list[Decision] = []
    for d in plan.decisions:
        density = d.spec.overlay_density
        if density is not None:
            spec = d.spec.with_overlay_density(min(1.0, density * factor))
            itemsize = d.bytes_before // max(1, d.shape[0] * d.shape[1])
            d = d.model_copy(update={"spec": spec, "bytes_after": spec.nbytes(d.shape, itemsize),
                                     "params_after": spec.nparams(d.shape), "error": None})
        decisions.append(d)
    return plan.model_copy(update={"decisions": decisions})
