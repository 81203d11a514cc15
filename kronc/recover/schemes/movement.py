"""First-order movement importance and movement pruning of dense linear weights (Sanh et al.).

Movement pruning keeps the weights that *move away from zero* during fine-tuning rather than the
largest ones. Its first-order importance of weight ``W_ij`` accumulated over the steps is

    S_ij = - Σ_t W_ij(t) * ∂L/∂W_ij(t)

(large when gradient descent is growing ``|W_ij|``). LPAF (low-rank prune-and-factorize) found that
the masks first-order pruning produces have a low-rank structure that matrix factorization can
exploit; `kronc.recover.schemes.lpaf` factorizes the pruned weights.

* `MovementScores` only accumulates ``S`` (``after_backward``); `movement_prune` turns scores (or
  plain magnitudes) into masks at a density, per layer or globally, and zeroes the rest.
* `MovementPruning` prunes progressively during fine-tuning with the cubic schedule of Zhu & Gupta:
  the kept fraction is ``d(t) = final + (1 - final) * (1 - frac)^3`` with ``frac`` going from 0 at
  ``warmup_fraction`` of the steps to 1 at ``end_fraction``; every ``update_every`` steps, among the
  weights still kept, the ones with the highest accumulated score are kept (a pruned weight is
  zeroed and frozen: no regrowth, unlike the straight-through variant of the paper). `finish`
  applies exactly ``count_kept(final_density, out * in)`` per layer; the masks are in ``masks``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...formats.sparse_index import count_kept
from ._common import (
    DenseTarget,
    census,
    check_fraction,
    check_steps,
    dense_targets,
    describe_filter,
    match_names,
    topk_mask,
)
from .base import Scheme


def _targets(scheme: str, model: nn.Module, include: str | None, exclude: str | None) -> list[DenseTarget]:
    targets = dense_targets(model, include, exclude)
    if not targets:
        raise ValueError(f"{scheme}: no dense Linear/Conv1D weights{describe_filter(include, exclude)} in the model "
                         f"(found formats: {census(model)})")
    return targets


class MovementScores(Scheme):
    """Accumulates ``S = -Σ_t W ⊙ ∇W`` (float32, logical ``(out, in)`` shape) for every dense linear."""

    name = "movement_scores"

    def __init__(self, include: str | None = None, exclude: str | None = None, enabled: bool = True) -> None:
        self.include, self.exclude = include, exclude
        self.enabled = bool(enabled)
        self.targets: list[DenseTarget] = []
        self._scores: list[Tensor] = []
        self._pending: dict[str, Any] | None = None

    def attach(self, model: nn.Module, total_steps: int) -> None:
        if not self.enabled:
            return
        check_steps(type(self).__name__, total_steps)
        self.targets = _targets(type(self).__name__, model, self.include, self.exclude)
        self._scores = [torch.zeros(t.shape, dtype=torch.float32, device=t.param.device) for t in self.targets]
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    def after_backward(self, step: int) -> None:
        if not self.enabled:
            return
        with torch.no_grad():
            for t, s in zip(self.targets, self._scores, strict=True):
                g = t.grad()
                if g is not None:
                    s.sub_((t.data() * g).float())

    @property
    def scores(self) -> dict[str, Tensor]:
        """Accumulated importance per module name."""
        return {t.name: s for t, s in zip(self.targets, self._scores, strict=True)}

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        return {"names": [t.name for t in self.targets], "scores": [s.clone() for s in self._scores]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.targets:
            self._pending = dict(state)
            return
        match_names(type(self).__name__, [t.name for t in self.targets], list(state["names"]))
        self._scores = [s.to(device=t.param.device, dtype=torch.float32).clone() for t, s in zip(self.targets, state["scores"], strict=True)]


def movement_prune(
    model: nn.Module,
    density: float,
    scores: MovementScores | Mapping[str, Tensor] | None = None,
    *,
    scope: Literal["layer", "global"] = "layer",
    include: str | None = None,
    exclude: str | None = None,
) -> dict[str, Tensor]:
    """Keep the ``density`` fraction of each dense linear weight with the highest score; zero the rest in place.

    ``scores``: a `MovementScores` scheme or a mapping from module name to an ``(out, in)`` score;
    None ranks by ``|W|`` (magnitude pruning). ``scope="layer"`` keeps exactly ``count_kept(density,
    out * in)`` per layer; ``"global"`` keeps that fraction of all the weights together (scores
    compared across layers). Returns the boolean masks (logical ``(out, in)``) by module name.
    """
    scheme = "movement_prune"
    density = check_fraction(scheme, "density", density)
    if scope not in ("layer", "global"):
        raise ValueError(f"{scheme}: scope must be 'layer' or 'global', got {scope!r}")
    table = scores.scores if isinstance(scores, MovementScores) else scores
    targets = _targets(scheme, model, include, exclude)
    if table is not None:
        missing = sorted(set(table) - {t.name for t in dense_targets(model)})
        if missing:
            raise ValueError(f"{scheme}: scores name {', '.join(missing[:4])}, not dense Linear/Conv1D layers of the model")
        targets = [t for t in targets if t.name in table]
        if not targets:
            raise ValueError(f"{scheme}: none of the scored layers{describe_filter(include, exclude)} is in the model")
    ranked: dict[str, Tensor] = {}
    for t in targets:
        s = t.data().abs() if table is None else table[t.name]
        if tuple(s.shape) != t.shape:
            raise ValueError(f"{scheme}: the score for {t.name} is {tuple(s.shape)}, the weight is {t.shape}")
        ranked[t.name] = s.detach().to(device=t.param.device, dtype=torch.float64)
    masks: dict[str, Tensor] = {}
    if scope == "layer":
        for t in targets:
            masks[t.name] = topk_mask(ranked[t.name], count_kept(density, t.param.numel()))
    else:
        flat = torch.cat([ranked[t.name].flatten().cpu() for t in targets])
        keep = topk_mask(flat, count_kept(density, flat.numel()))
        at = 0
        for t in targets:
            n = t.param.numel()
            masks[t.name] = keep[at:at + n].reshape(t.shape).to(t.param.device)
            at += n
    with torch.no_grad():
        for t in targets:
            t.data().mul_(masks[t.name].to(t.param.dtype))
    return masks


class MovementPruning(Scheme):
    """Progressive movement pruning to ``final_density`` (per layer) on the cubic schedule."""

    name = "movement_pruning"

    def __init__(
        self,
        final_density: float,
        warmup_fraction: float = 0.1,
        end_fraction: float = 0.8,
        update_every: int = 1,
        include: str | None = None,
        exclude: str | None = None,
        enabled: bool = True,
    ) -> None:
        scheme = type(self).__name__
        self.final_density = check_fraction(scheme, "final_density", final_density)
        self.warmup_fraction = check_fraction(scheme, "warmup_fraction", warmup_fraction, low_open=False, high_open=True)
        self.end_fraction = check_fraction(scheme, "end_fraction", end_fraction)
        if self.end_fraction <= self.warmup_fraction:
            raise ValueError(f"{scheme}: end_fraction={end_fraction} must be after warmup_fraction={warmup_fraction}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"{scheme}: update_every must be a positive integer, got {update_every!r}")
        self.update_every = update_every
        self.enabled = bool(enabled)
        self.movement = MovementScores(include, exclude, enabled)
        self._masks: list[Tensor] = []
        self.warm_step, self.end_step = 0, 1
        self._pending: dict[str, Any] | None = None

    @property
    def targets(self) -> list[DenseTarget]:
        return self.movement.targets

    def attach(self, model: nn.Module, total_steps: int) -> None:
        if not self.enabled:
            return
        scheme = type(self).__name__
        check_steps(scheme, total_steps)
        self.movement.targets = _targets(scheme, model, self.movement.include, self.movement.exclude)
        self.movement._scores = [torch.zeros(t.shape, dtype=torch.float32, device=t.param.device) for t in self.targets]
        self._masks = [torch.ones(t.shape, dtype=torch.bool, device=t.param.device) for t in self.targets]
        self.warm_step = round(self.warmup_fraction * total_steps)
        self.end_step = max(self.warm_step + 1, round(self.end_fraction * total_steps))
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    def density_at(self, step: int) -> float:
        """The scheduled kept fraction at ``step``."""
        return cubic_density(self.final_density, (step - self.warm_step) / (self.end_step - self.warm_step))

    def _prune_to(self, step_density: float | None) -> None:
        for i, t in enumerate(self.targets):
            keep = count_kept(self.final_density if step_density is None else step_density, t.param.numel())
            if keep < int(self._masks[i].sum()):
                self._masks[i] = topk_mask(self.movement._scores[i], keep, within=self._masks[i])
        self._apply()

    def _apply(self) -> None:
        with torch.no_grad():
            for t, m in zip(self.targets, self._masks, strict=True):
                t.data().mul_(m.to(t.param.dtype))

    def before_step(self, step: int) -> None:
        if not self.enabled:
            return
        if step % self.update_every == 0 or step >= self.end_step:
            self._prune_to(self.density_at(step))
        else:
            self._apply()

    def after_backward(self, step: int) -> None:
        if not self.enabled:
            return
        self.movement.after_backward(step)
        for t, m in zip(self.targets, self._masks, strict=True):
            g = t.grad()
            if g is not None:
                g.mul_(m.to(g.dtype))

    def after_step(self, step: int) -> None:
        if self.enabled:
            self._apply()

    def finish(self, model: nn.Module) -> None:
        if self.enabled and self.targets:
            self._prune_to(None)

    @property
    def masks(self) -> dict[str, Tensor]:
        """Current boolean masks (logical ``(out, in)``) by module name."""
        return {t.name: m for t, m in zip(self.targets, self._masks, strict=True)}

    @property
    def scores(self) -> dict[str, Tensor]:
        return self.movement.scores

    def density(self) -> float:
        total = sum(m.numel() for m in self._masks)
        return sum(int(m.sum()) for m in self._masks) / total if total else 1.0

    def metrics(self) -> dict[str, float]:
        return {"weight_density": self.density()} if self.enabled and self.targets else {}

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        return {**self.movement.state_dict(), "masks": [m.clone() for m in self._masks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.targets:
            self._pending = dict(state)
            return
        self.movement.load_state_dict(state)
        self._masks = [m.to(device=t.param.device, dtype=torch.bool).clone() for t, m in zip(self.targets, state["masks"], strict=True)]
        self._apply()


def cubic_density(final_density: float, frac: float) -> float:
    """Zhu & Gupta's cubic schedule: kept fraction after ``frac`` (0..1) of the pruning window."""
    frac = min(1.0, max(0.0, frac))
    return final_density + (1.0 - final_density) * (1.0 - frac) ** 3

