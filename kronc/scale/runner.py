"""Running one unit of a skeleton on cached inputs, through the model's own ``forward``.

The model is called on each calibration batch as usual, but the blocks before the one that runs are
stand-ins that return the cached output of the block before it, and a hook on the block stops the
call with its output. So every block receives exactly the arguments the model gives it (rotary
embeddings, masks, a per-layer attention type), which a hand-written call of the block could get
wrong; the embeddings and masks are recomputed per call, which costs little next to a block. The
tail (final norm, head) runs the same way with every block a stand-in for the last one.

`BlockView` wraps this as a module whose ``forward(batch_index)`` runs one unit, and which exposes the
skeleton's modules under their own names, so kronc's calibration (`collect_input_moments`) hooks
the sites' owners exactly as it does on the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..planning.calibrate import call_model
from ..recover.blocks import first_tensor
from .skeleton import Skeleton


class _Stop(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the hook on the running block to end the model's forward there."""

    def __init__(self, output: Any) -> None:
        super().__init__("stop")
        self.output = output


class _StandIn(nn.Module):
    """A block that returns a value it was given instead of computing."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.value



def with_stream(output: Any, stream: Tensor) -> Any:
    """A block output with its stream tensor replaced (a tensor, or a tuple / list whose first item it is)."""
    if isinstance(output, Tensor):
        return stream
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return type(output)([stream, *output[1:]])
    raise TypeError(f"a block returned a {type(output).__name__}: streamed compile handles tensors and tuples")


def run_block(skeleton: Skeleton, i: int, batch: Any, previous: Any) -> Any:
    """Block ``i``'s output on ``batch``, given block ``i - 1``'s output ``previous`` (None for block 0)."""
    blocks = skeleton.blocks
    real = [blocks[j] for j in range(i)]
    stand_in = _StandIn(previous)
    handle = blocks[i].register_forward_hook(_stop)
    try:
        for j in range(i):
            blocks[j] = stand_in
        call_model(skeleton.model, batch)
    except _Stop as stop:
        return stop.output
    finally:
        handle.remove()
        for j, m in enumerate(real):
            blocks[j] = m
    raise RuntimeError(f"the model returned without running {skeleton.container}.{i}")


def run_tail(skeleton: Skeleton, batch: Any, last: Any) -> Any:
    """The model's output on ``batch`` when its last block returned ``last`` (every block a stand-in)."""
    blocks = skeleton.blocks
    real = list(blocks)
    stand_in = _StandIn(last)
    try:
        for j in range(len(real)):
            blocks[j] = stand_in
        return call_model(skeleton.model, batch)
    finally:
        for j, m in enumerate(real):
            blocks[j] = m


def _stop(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    raise _Stop(output)


class BlockView(nn.Module):
    """The skeleton's modules under their own names; ``forward(k)`` runs ``step(k)`` (one unit on batch ``k``)."""

    def __init__(self, skeleton: Skeleton, step: Callable[[int], Any]) -> None:
        super().__init__()
        self._modules.update(skeleton.model._modules)
        self._step = step

    def forward(self, k: int) -> Any:
        return self._step(k)

    def train(self, mode: bool = True) -> BlockView:  # the skeleton's own flags are left as they are
        return self


def stream_of(output: Any) -> Tensor:
    return first_tensor(output)


def unit_grads(skeleton: Skeleton, i: int | None, batch: Any, stream_in: Tensor, grad_out: Tensor | None,
               owners: Sequence[str], loss: Callable[[Any, Any], Tensor] | None = None
               ) -> tuple[dict[str, list[Tensor]], Tensor]:
    """Gradients at the outputs of ``owners`` and at the unit's stream input, for one batch.

    Block ``i`` runs on ``stream_in`` (a leaf) and its stream output is back-propagated with ``grad_out``;
    the tail (``i`` None) runs on the last block's output and back-propagates ``loss(output, batch)``.
    """
    x = stream_in.detach().requires_grad_(True)
    outputs: dict[str, list[Tensor]] = {}
    handles = []
    for owner in owners:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any, owner: str = owner) -> None:
            if isinstance(out, Tensor) and out.requires_grad:
                outputs.setdefault(owner, []).append(out)

        handles.append(skeleton.model.get_submodule(owner).register_forward_hook(hook))
    try:
        with torch.enable_grad():
            if i is None:
                assert loss is not None
                target = loss(run_tail(skeleton, batch, x), batch)
                grad_out = None
            else:
                target = stream_of(run_block(skeleton, i, batch, x))
            names = [o for o in outputs for _ in outputs[o]]
            tensors = [t for o in outputs for t in outputs[o]]
            grads = torch.autograd.grad(target, [*tensors, x], grad_outputs=grad_out, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    found: dict[str, list[Tensor]] = {}
    for name, g in zip(names, grads[:-1], strict=True):
        if g is not None:
            found.setdefault(name, []).append(g)
    g_in = grads[-1] if grads[-1] is not None else torch.zeros_like(x)
    return found, g_in.detach()
