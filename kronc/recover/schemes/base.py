"""The hook interface through which a training scheme takes part in `kronc.recover`.

A *scheme* is one of the seed papers' training-time techniques (co-matrix dropout, overlay density
annealing, reweighted group lasso, movement-pruning scores, ...). The recovery loop knows nothing
about any of them: it calls these hooks in this order on every step::

    scheme.attach(model, total_steps)            # once, before the first step
    for step in range(start, total_steps):
        scheme.before_step(step)                 # e.g. draw dropout masks, set annealed density
        loss = task_loss + sum(p for s in schemes if (p := s.penalty(step)) is not None)
        loss.backward()
        scheme.after_backward(step)              # e.g. accumulate movement scores from .grad
        optimizer.step()
        scheme.after_step(step)                  # e.g. re-apply masks, refresh reweighting
    scheme.finish(model)                         # once: hard prune, repack, detach hooks

``state_dict``/``load_state_dict`` let a checkpoint resume a scheme mid-way (accumulated scores,
current masks, reweighting factors) so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class Scheme:
    """Base class: every hook is a no-op, a scheme overrides the ones it needs."""

    name: str = "scheme"

    def attach(self, model: nn.Module, total_steps: int) -> None:
        """Find the modules the scheme acts on; raise ``ValueError`` naming the problem if there are none."""

    def before_step(self, step: int) -> None:
        """Called before the forward pass of ``step`` (0-based)."""

    def penalty(self, step: int) -> Tensor | None:
        """A differentiable term added to the loss, or None."""
        return None

    def after_backward(self, step: int) -> None:
        """Called after ``loss.backward()`` and before the optimizer step; gradients are populated."""

    def after_step(self, step: int) -> None:
        """Called after the optimizer step."""

    def finish(self, model: nn.Module) -> None:
        """Called once after the last step (hard pruning, repacking, removing hooks)."""

    def metrics(self) -> dict[str, float]:
        """Numbers worth showing in the progress bar / log (e.g. current overlay density)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
