"""The part of the model after its last block (final norm, LM head), reconstructed on the model's output.

Blocks cover the residual stream; a compressed LM head (or pooler, or LSTM decoder) sits after it and
no block target sees it. After the last block, the student's final stream is cached, so the tail can
train on it alone: each block is swapped for a `_Feed` that returns the cached stream (the first) or
hands its input on unchanged (the rest), and the student runs from its inputs to its output with the
blocks skipped (for LSTM layer views, the last recurrent module alone is swapped: the ones before it run,
since later layers may read their outputs too). The target is the dense teacher's output on the same inputs, made per step the same way
(the teacher's blocks skipped, its cached final stream fed in), so only one hidden stream per batch is
cached, never the outputs (a large vocabulary's logits would be); the loss is the recipe's
output loss (KL at ``temperature`` for logits, relative squared error otherwise). Parameters before the
first block (embeddings) get no gradient through a `_Feed`, so only the tail trains.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from .blocks import BlockChain


class _Feed(nn.Module):
    """Stands in for a block: returns ``value`` when set (the first block), else its stream input."""

    def __init__(self, slot: int | str, tuple_output: bool) -> None:
        super().__init__()
        self.slot, self.tuple_output = slot, tuple_output
        self.value: Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = self.value if self.value is not None else (args[self.slot] if isinstance(self.slot, int) else kwargs[self.slot])
        return (x, None) if self.tuple_output else x


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


@contextmanager
def blocks_skipped(model: nn.Module, chain: BlockChain, tuple_output: bool) -> Iterator[_Feed]:
    """Swap the chain's modules for `_Feed` modules; yields the first (set its ``value`` per batch)."""
    # LSTMs split into layer views: only the last module is skipped (its output is the cached stream); the ones
    # before it run, so a layer reading an earlier LSTM's output too (textgenrnn's skip connections) sees it
    names = chain.recurrent[-1:] if chain.recurrent else [b.name for b in chain.blocks]
    feeds = [_Feed(chain.blocks[0].slot, tuple_output) for _ in names]
    originals = []
    for name, feed in zip(names, feeds, strict=True):
        parent, child = _parent(model, name)
        # ModuleList and Sequential keep their items under "0", "1", ...: the same get/set covers them
        originals.append((parent, child, parent.get_submodule(child)))
        setattr(parent, child, feed)
    try:
        yield feeds[0]
    finally:
        for parent, child, module in originals:
            setattr(parent, child, module)
