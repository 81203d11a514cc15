"""Reweighted group lasso for block-structured pruning (Li et al., hardware-friendly block pruning).

Before a model is compressed, its dense linear weights are trained with a penalty that pushes whole
``(bo, bi)`` blocks to zero:

    penalty = strength * Σ_layers Σ_g w_g ||W_g||_F,     w_g = 1 / (||W_g||_F + eps)

with the weights ``w_g`` held constant between refreshes (every ``refresh_every`` steps, from the
current block norms): blocks that are already small get a large weight and are pushed to zero,
large ones are barely penalised (the reweighting approximates an L0 penalty on blocks).

Then `prune_blocks` hard-prunes each layer to the blocks with the largest norms (exactly as many as
`BlockSparseSpec(block, density).nblocks(shape)` keeps) and returns a `BlockMask` scheme that keeps
the pruned blocks at exactly zero during masked fine-tuning (weights zeroed before and after every
optimizer step, their gradients after backward). `BlockMask.to_blocksparse` then swaps each pruned
layer for a `CompressedLinear` holding a `BlockSparse` of exactly those blocks (lossless), and
records it in the model's ``kronc_plan``; `BlockSparse.fit` with the same block and density picks the
same blocks, since the pruned ones are zero.

Acts on ``nn.Linear`` and Hugging Face ``Conv1D`` weights in their logical ``(out, in)`` orientation;
``include``/``exclude`` are regexes searched in the module names; layers the block does not divide
are left out (listed in ``skipped``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...budget import Budget
from ...formats import BlockSparse, BlockSparseSpec, SparseIndex
from ...formats.blocksparse import to_blocks
from ...formats.sparse_index import index_bytes
from ._common import (
    DenseTarget,
    census,
    check_block,
    check_fraction,
    check_positive,
    check_steps,
    dense_targets,
    describe_filter,
    match_names,
    swap_in,
    topk_mask,
)
from .base import Scheme


def block_norms(weight: Tensor, block: tuple[int, int]) -> Tensor:
    """Frobenius norm of every ``block`` tile of an ``(out, in)`` weight: ``(out/bo, in/bi)`` (differentiable)."""
    return torch.linalg.vector_norm(to_blocks(weight, block), dim=(2, 3))


def expand_blocks(mask: Tensor, block: tuple[int, int]) -> Tensor:
    """A ``(grid_rows, grid_cols)`` block mask as an ``(out, in)`` element mask."""
    return mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


def _divisible(targets: list[DenseTarget], block: tuple[int, int]) -> tuple[list[DenseTarget], list[str]]:
    ok: list[DenseTarget] = []
    skipped: list[DenseTarget] = []
    for t in targets:
        (ok if t.shape[0] % block[0] == 0 and t.shape[1] % block[1] == 0 else skipped).append(t)
    return ok, [t.name for t in skipped]


def _block_targets(scheme: str, model: nn.Module, block: tuple[int, int], include: str | None,
                   exclude: str | None) -> tuple[list[DenseTarget], list[str]]:
    targets = dense_targets(model, include, exclude)
    if not targets:
        raise ValueError(f"{scheme}: no dense Linear/Conv1D weights{describe_filter(include, exclude)} in the model "
                         f"(found formats: {census(model)})")
    ok, skipped = _divisible(targets, block)
    if not ok:
        shapes = ", ".join(f"{t.name} {t.shape[0]}x{t.shape[1]}" for t in targets[:4])
        raise ValueError(f"{scheme}: block={block} divides none of the dense weights ({shapes}"
                         f"{', ...' if len(targets) > 4 else ''})")
    return ok, skipped


class ReweightedGroupLasso(Scheme):
    """Penalty ``strength * Σ_g w_g ||W_g||_F`` over ``block`` tiles of dense linear weights, reweighted.

    ``prune_density`` (optional) makes `finish` hard-prune with `prune_blocks` at that density; the
    resulting `BlockMask` (for the masked fine-tuning phase) is left in ``self.block_mask``.
    """

    name = "reweighted_group_lasso"

    def __init__(
        self,
        block: tuple[int, int],
        strength: float = 1e-3,
        refresh_every: int = 100,
        eps: float = 1e-3,
        include: str | None = None,
        exclude: str | None = None,
        prune_density: float | None = None,
        enabled: bool = True,
    ) -> None:
        scheme = type(self).__name__
        self.block = check_block(scheme, block)
        self.strength = check_positive(scheme, "strength", strength, allow_zero=True)
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"{scheme}: refresh_every must be a positive integer, got {refresh_every!r}")
        self.refresh_every = refresh_every
        self.eps = check_positive(scheme, "eps", eps)
        self.include, self.exclude = include, exclude
        self.prune_density = None if prune_density is None else check_fraction(scheme, "prune_density", prune_density)
        self.enabled = bool(enabled)
        self.targets: list[DenseTarget] = []
        self.skipped: list[str] = []
        self.reweights: list[Tensor] = []
        self.block_mask: BlockMask | None = None
        self._last = 0.0
        self._pending: dict[str, Any] | None = None

    def attach(self, model: nn.Module, total_steps: int) -> None:
        if not self.enabled:
            return
        scheme = type(self).__name__
        check_steps(scheme, total_steps)
        self.targets, self.skipped = _block_targets(scheme, model, self.block, self.include, self.exclude)
        self.refresh()
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    def refresh(self) -> None:
        """``w_g = 1 / (||W_g||_F + eps)`` from the current weights."""
        with torch.no_grad():
            self.reweights = [1.0 / (block_norms(t.weight().detach().double(), self.block) + self.eps) for t in self.targets]

    def before_step(self, step: int) -> None:
        if self.enabled and step > 0 and step % self.refresh_every == 0:
            self.refresh()

    def penalty(self, step: int) -> Tensor | None:
        if not self.enabled or not self.targets or self.strength == 0:
            return None
        total: Tensor | None = None
        for t, w in zip(self.targets, self.reweights, strict=True):
            weight = t.weight()
            term = (w.to(weight.dtype) * block_norms(weight, self.block)).sum()
            total = term if total is None else total + term
        assert total is not None
        out = self.strength * total
        self._last = float(out.detach())
        return out

    def finish(self, model: nn.Module) -> None:
        if self.enabled and self.prune_density is not None:
            self.block_mask = prune_blocks(model, self.prune_density, self.block, self.include, self.exclude)

    def group_norms(self) -> dict[str, Tensor]:
        """Current block norms per layer (for inspection)."""
        with torch.no_grad():
            return {t.name: block_norms(t.weight().detach(), self.block) for t in self.targets}

    def metrics(self) -> dict[str, float]:
        return {"group_lasso": self._last} if self.enabled and self.targets else {}

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        return {"names": [t.name for t in self.targets], "reweights": [w.clone() for w in self.reweights]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.targets:
            self._pending = dict(state)
            return
        match_names(type(self).__name__, [t.name for t in self.targets], list(state["names"]))
        self.reweights = [w.clone() for w in state["reweights"]]


class BlockMask(Scheme):
    """Keeps pruned blocks at exactly zero during fine-tuning: ``masks`` maps module names to block masks."""

    name = "block_mask"

    def __init__(self, masks: dict[str, Tensor], block: tuple[int, int], enabled: bool = True) -> None:
        scheme = type(self).__name__
        self.block = check_block(scheme, block)
        if not masks:
            raise ValueError(f"{scheme}: masks is empty")
        self.masks = {k: v.to(torch.bool) for k, v in masks.items()}
        self.enabled = bool(enabled)
        self.targets: list[DenseTarget] = []
        self._elements: list[Tensor] = []

    def attach(self, model: nn.Module, total_steps: int = 1) -> None:
        if not self.enabled:
            return
        scheme = type(self).__name__
        by_name = {t.name: t for t in dense_targets(model)}
        missing = [n for n in self.masks if n not in by_name]
        if missing:
            raise ValueError(f"{scheme}: no dense Linear/Conv1D named {', '.join(missing[:4])} in the model "
                             f"(found formats: {census(model)})")
        self.targets = [by_name[n] for n in self.masks]
        self._elements = []
        for t in self.targets:
            mask = self.masks[t.name]
            grid = (t.shape[0] // self.block[0], t.shape[1] // self.block[1])
            if tuple(mask.shape) != grid or t.shape[0] % self.block[0] or t.shape[1] % self.block[1]:
                raise ValueError(f"{scheme}: the mask for {t.name} is {tuple(mask.shape)}, the {t.shape[0]}x{t.shape[1]} "
                                 f"weight has a {grid} grid of {self.block} blocks")
            self._elements.append(expand_blocks(mask.to(t.param.device), self.block))
        self.apply()

    def apply(self) -> None:
        """Zero the pruned blocks of every weight."""
        with torch.no_grad():
            for t, m in zip(self.targets, self._elements, strict=True):
                t.data().mul_(m.to(t.param.dtype))

    def before_step(self, step: int) -> None:
        if self.enabled:
            self.apply()

    def after_backward(self, step: int) -> None:
        if not self.enabled:
            return
        for t, m in zip(self.targets, self._elements, strict=True):
            g = t.grad()
            if g is not None:
                g.mul_(m.to(g.dtype))

    def after_step(self, step: int) -> None:
        if self.enabled:
            self.apply()

    def finish(self, model: nn.Module) -> None:
        if self.enabled:
            self.apply()

    def kept(self) -> dict[str, int]:
        return {n: int(m.sum()) for n, m in self.masks.items()}

    def density(self) -> float:
        return sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())

    def metrics(self) -> dict[str, float]:
        return {"block_density": self.density()} if self.enabled else {}

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: v.clone() for k, v in self.masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = {k: v.to(torch.bool) for k, v in state["masks"].items()}
        if set(masks) != set(self.masks):
            raise ValueError(f"{type(self).__name__}: the saved masks are for {sorted(masks)}, not {sorted(self.masks)}")
        self.masks = masks
        if self.targets:
            self._elements = [expand_blocks(self.masks[t.name].to(t.param.device), self.block) for t in self.targets]
            self.apply()

    def to_blocksparse(self, model: nn.Module) -> dict[str, BlockSparse]:
        """Swap every masked layer for a `CompressedLinear` storing exactly its kept blocks (lossless).

        Each gets a `BlockSparseSpec(block, density=kept/total)` (its ``nblocks`` is the kept count),
        recorded in the model's ``kronc_plan``. Returns the new formats by module name.
        """
        if not self.targets:
            self.attach(model)
        self.apply()
        out: dict[str, BlockSparse] = {}
        for t in self.targets:
            mask = self.masks[t.name]
            spec = BlockSparseSpec(block=self.block, density=int(mask.sum()) / mask.numel())
            if spec.nblocks(t.shape) != int(mask.sum()):  # pragma: no cover - count_kept(k/n, n) == k
                raise RuntimeError(f"{type(self).__name__}: density {spec.density} does not keep {int(mask.sum())} blocks")
            index = SparseIndex.from_mask(mask.to(t.param.device))
            rows, cols = index.decode()
            tiles = to_blocks(t.data(), self.block)[rows, cols].clone()
            fmt = BlockSparse(index, tiles, spec)
            swap_in(model, t, fmt)
            out[t.name] = fmt
        self.targets, self._elements = [], []
        return out


def prune_blocks(
    model: nn.Module,
    density: float | str,
    block: tuple[int, int],
    include: str | None = None,
    exclude: str | None = None,
) -> BlockMask:
    """Zero all but the largest-norm blocks of every dense linear weight (in place); return their `BlockMask`.

    ``density`` is the fraction of blocks each layer keeps (exactly ``BlockSparseSpec(block,
    density).nblocks(shape)``, at least one), or a ratio budget (``"4x"``): each layer keeps as many
    blocks as fit in its dense bytes / ratio, block index included (as `BlockSparseSpec.nbytes` counts).
    """
    scheme = "prune_blocks"
    block = check_block(scheme, block)
    ratio: float | None = None
    if isinstance(density, str):
        budget = Budget.parse(density)
        if budget.unit != "ratio":
            raise ValueError(f"{scheme}: a budget for prune_blocks must be a ratio like '4x', got {density!r}")
        ratio = budget.value
    else:
        density = check_fraction(scheme, "density", density)
    targets, _ = _block_targets(scheme, model, block, include, exclude)
    masks: dict[str, Tensor] = {}
    with torch.no_grad():
        for t in targets:
            norms = block_norms(t.data().double(), block)
            if ratio is None:
                keep = BlockSparseSpec(block=block, density=density).nblocks(t.shape)
            else:
                keep = _blocks_within(t, block, ratio)
            mask = topk_mask(norms, keep)
            t.data().mul_(expand_blocks(mask, block).to(t.param.dtype))
            masks[t.name] = mask
    return BlockMask(masks, block)


def _blocks_within(t: DenseTarget, block: tuple[int, int], ratio: float) -> int:
    """Most blocks whose values plus index fit in ``dense bytes / ratio`` (at least one)."""
    (out, inp), itemsize = t.shape, t.param.element_size()
    grid = (out // block[0], inp // block[1])
    cap = out * inp * itemsize / ratio
    size = block[0] * block[1] * itemsize
    lo, hi = 1, grid[0] * grid[1]
    while lo < hi:  # bytes grow with the count: binary search the largest that fits
        mid = (lo + hi + 1) // 2
        if mid * size + index_bytes(grid, mid)[1] <= cap:
            lo = mid
        else:
            hi = mid - 1
    return lo


__all__ = ["BlockMask", "ReweightedGroupLasso", "block_norms", "expand_blocks", "prune_blocks"]
