"""The block-wise cache: each calibration batch's block inputs and targets, and how they are captured.

A forward pre-hook (with kwargs) on the first block records its inputs (attention masks and position
embeddings included) and raises `_Stop` to end the pass there, so capture costs the embeddings, not the
model. Entries live in memory or, with a directory, as one ``torch.save`` file each (``cache: disk``);
`check_memory` prints the size first and refuses an in-memory cache over ``max_cache_gb``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .batches import Batch
from .blocks import BlockChain, Slot, first_tensor
from .config import RecoveryConfig, RecoveryError
from .guards import device_of

log = logging.getLogger("kronc.recover")


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass once the first block's inputs are recorded."""


def _detach(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def _nbytes(x: Any) -> int:
    if isinstance(x, Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    return 0


Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def stream_of(inputs: Inputs, slot: Slot) -> Tensor:
    args, kwargs = inputs
    return args[slot] if isinstance(slot, int) else kwargs[slot]


def with_stream(inputs: Inputs, slot: Slot, x: Tensor) -> Inputs:
    args, kwargs = inputs
    if isinstance(slot, int):
        return (*args[:slot], x, *args[slot + 1 :]), kwargs
    return args, {**kwargs, slot: x}


class BlockCache:
    """Each calibration batch's block inputs, the teacher's target and the positions' mask."""

    def __init__(self, disk: str | None) -> None:
        self.dir, self.owned = disk, False
        if disk == "":
            self.dir, self.owned = tempfile.mkdtemp(prefix="kronc-blockwise-"), True
        elif disk is not None:
            Path(disk).mkdir(parents=True, exist_ok=True)
        self.inputs: list[Any] = []
        self.targets: list[Any] = []
        self.extra_targets: list[Any] = []
        self.teacher_streams: list[Any] = []
        self.masks: list[Tensor | None] = []

    def _put(self, store: list[Any], j: int, kind: str, value: Any) -> None:
        if self.dir is not None:
            path = os.path.join(self.dir, f"{kind}{j}.pt")
            torch.save(value, path)
            value = path
        if j == len(store):
            store.append(value)
        else:
            store[j] = value

    def _get(self, store: list[Any], j: int) -> Any:
        value = store[j]
        return torch.load(value, weights_only=False) if self.dir is not None else value

    def set_inputs(self, j: int, value: Inputs) -> None:
        self._put(self.inputs, j, "x", value)

    def get_inputs(self, j: int) -> Inputs:
        return self._get(self.inputs, j)

    def set_target(self, j: int, value: Tensor) -> None:
        self._put(self.targets, j, "y", value)

    def get_target(self, j: int) -> Tensor:
        return self._get(self.targets, j)

    def set_extra_target(self, j: int, value: Tensor) -> None:
        self._put(self.extra_targets, j, "z", value)

    def get_extra_target(self, j: int) -> Tensor:
        return self._get(self.extra_targets, j)

    def set_teacher_stream(self, j: int, value: Tensor) -> None:
        self._put(self.teacher_streams, j, "t", value)

    def get_teacher_stream(self, j: int) -> Tensor:
        return self._get(self.teacher_streams, j)

    def __len__(self) -> int:
        return len(self.inputs)

    def close(self) -> None:
        if self.owned and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

def capture_inputs(student: nn.Module, teacher: nn.Module, chain: BlockChain, batches: list[Batch], extra: dict[str, Any],
             cache: BlockCache, cfg: RecoveryConfig, progress: bool) -> None:
    """Record the first block's inputs for every calibration batch (stopping each pass there)."""
    seen: list[Inputs] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((_detach(args), _detach(kwargs)))
        raise _Stop

    device = device_of(student)
    handle = chain.entry.register_forward_pre_hook(hook, with_kwargs=True)
    t_handle = chain.teacher_entry.register_forward_pre_hook(hook, with_kwargs=True)
    teacher_stream = cfg.blockwise.target != "student_inputs"
    try:
        for j, batch in enumerate(batches):
            b = batch.to(device)
            if teacher_stream:
                with torch.no_grad(), contextlib.suppress(_Stop):
                    teacher(*b.args, **b.kwargs, **extra)
                cache.set_teacher_stream(j, stream_of(seen.pop(), chain.blocks[0].slot))
            with torch.no_grad(), contextlib.suppress(_Stop):
                student(*b.args, **b.kwargs, **extra)
            if len(seen) != 1:
                raise RecoveryError(f"the first block {chain.blocks[0].name!r} ran {len(seen)} times in one forward "
                                    "pass; block-wise reconstruction needs each block to run once")
            inputs = seen.pop()
            if chain.entry is not chain.blocks[0].student and (len(inputs[0]) != 1 or inputs[1]):
                raise RecoveryError(f"{chain.container!r} was called with an initial state or keyword inputs; "
                                    "block-wise reconstruction splits LSTMs called on their input alone")
            if j == 0:
                check_memory(inputs, chain, len(batches), cfg, progress)
            cache.set_inputs(j, inputs)
            cache.masks.append(b.mask)
    finally:
        handle.remove()
        t_handle.remove()


def check_memory(inputs: Inputs, chain: BlockChain, n: int, cfg: RecoveryConfig, progress: bool) -> int:
    """Print (and log) the cache's size in bytes, and return it; raise when it is over ``max_cache_gb`` in memory."""
    one = _nbytes(stream_of(inputs, chain.blocks[0].slot))
    # the blocks' targets (+ the dense stream); the tail's target is the teacher's final stream, one stream
    # (in the place of the blocks' target), never the model's outputs: their vocabulary does not count
    stream = {"student_inputs": 1, "teacher_stream": 2, "both": 3}[cfg.blockwise.target] * one
    total = n * (_nbytes(inputs) + stream)  # inputs (masks, position embeddings included) + the targets
    bw = cfg.blockwise
    where = "on disk" if bw.cache == "disk" else "in memory"
    message = (f"block-wise cache: {n} batches x {cfg.batch_size} windows, inputs {_nbytes(inputs) / 2**20:.1f} MiB + "
               f"targets {stream / 2**20:.1f} MiB per batch = {total / 2**20:.1f} MiB {where}")
    log.info(message)
    if progress:
        print(f"[kronc.recover] {message}", file=sys.stderr, flush=True)
    if bw.cache == "memory" and total > bw.max_cache_gb * 2**30:
        raise RecoveryError(f"the block-wise cache needs {total / 2**30:.2f} GiB, over max_cache_gb={bw.max_cache_gb}: "
                            "set blockwise.cache='disk' (and cache_dir), or fewer blockwise.samples")
    return total


def teacher_final_stream(teacher: nn.Module, chain: BlockChain, b: Batch, extra: dict[str, Any]) -> Tensor:
    """The teacher's stream after its last block (its pass stops there: the tail runs per step)."""
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen.append(first_tensor(out).detach())
        raise _Stop

    # layer views: the last recurrent module's whole output
    module = teacher.get_submodule(chain.recurrent[-1]) if chain.recurrent else chain.blocks[-1].teacher
    handle = module.register_forward_hook(hook)
    try:
        with contextlib.suppress(_Stop):
            teacher(*b.args, **b.kwargs, **extra)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RecoveryError(f"the teacher's last block {chain.blocks[-1].name!r} ran {len(seen)} times in one "
                            "forward pass; block-wise reconstruction needs each block to run once")
    return seen[0]

