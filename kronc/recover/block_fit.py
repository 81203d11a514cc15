"""One block's training: AdamW over the cached batches, a record of how it went, and the safety rule.

`fit` is shared by the blocks and the tail: ``epochs`` seeded passes, a time limit per block, and a
block whose loss ends above where it started (or non-finite) gets its old weights back (`report` warns).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import parallel
from .config import RecoveryConfig
from .optim import make_optimizer, make_scheduler

log = logging.getLogger("kronc.recover")


@dataclass(frozen=True)
class BlockRecord:
    """How one block's reconstruction went (losses are mean relative squared errors on the calibration set)."""

    name: str
    params: int
    """Trainable parameter values in the block."""
    loss_before: float
    loss_after: float
    """The loss of the weights the block ends with (``loss_before`` when it kept its initial weights)."""
    kept_initial: bool
    """True when training raised the loss (or made it non-finite) and the block got its old weights back."""
    loss_trained: float
    """The loss training reached (NaN when it became non-finite), kept or not."""
    steps: int
    seconds: float
    tokens: int
    """Input tokens the block's training steps processed (windows x positions, all epochs)."""
    timed_out: bool = False
    """True when the block's share of ``blockwise.max_seconds`` ran out before all its epochs."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def progress_bar(total: int, desc: str, enabled: bool, position: int, leave: bool, initial: int = 0) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step" if position else "block", position=position,
                leave=leave, dynamic_ncols=True)


def report(record: BlockRecord) -> None:
    if record.kept_initial:
        message = (f"block {record.name}: loss {record.loss_before:.4g} rose to {record.loss_trained:.4g} in "
                   "training; it keeps its weights from before")
        warnings.warn(message, stacklevel=4)
        log.warning(message)


def fit(student: nn.Module, name: str, index: int, chosen: dict[str, nn.Parameter], loss_of: Any,
         tokens_of: list[int], cfg: RecoveryConfig, progress: bool, until: float | None = None) -> BlockRecord:
    """``epochs`` passes of AdamW over the cached batches (order seeded by ``seed`` and ``index``), no step
    starting after ``until`` (a `time.perf_counter` value; None: all of them); the parameters go back to
    where they started when the mean loss ends higher (or non-finite).

    Under torch.distributed each rank's cache holds its slice of every batch: the losses are averaged over
    the ranks (every rank keeps or reverts alike), the gradients too (every rank takes the same step), and
    a time limit stops every rank at the same step."""
    bw = cfg.blockwise
    n = len(tokens_of)

    def mean_loss() -> float:
        with torch.no_grad():
            return parallel.mean_over_ranks(float(torch.stack([loss_of(j).reshape(()) for j in range(n)]).mean()))

    loss_before = mean_loss()
    chosen = {k: p for k, p in chosen.items() if p.numel()}
    if not chosen:
        return BlockRecord(name, 0, loss_before, loss_before, False, loss_before, 0, 0.0, 0)
    saved = {k: p.detach().clone() for k, p in chosen.items()}
    ids = {id(p) for p in chosen.values()}
    for p in student.parameters():
        p.requires_grad_(id(p) in ids)
    steps = bw.epochs * n
    block_cfg = cfg.model_copy(update={"lr": bw.lr, "steps": steps})
    optimizer = make_optimizer(student, chosen, block_cfg)
    scheduler = make_scheduler(optimizer, block_cfg)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7_919 * (index + 1))
    bar = progress_bar(steps, name, progress, 1, False)
    tokens, finite, used, done, timed_out, t0 = 0, True, 0, 0, False, time.perf_counter()
    try:
        for _ in range(bw.epochs):
            for j in torch.randperm(n, generator=g).tolist():
                if until is not None and parallel.any_rank(time.perf_counter() >= until):
                    timed_out = True
                    break
                optimizer.zero_grad(set_to_none=True)
                error: Exception | None = None
                try:  # this rank's part of the step; a failure reaches the other ranks before any all_reduce
                    loss = loss_of(j)
                    loss.backward()  # a non-finite loss is caught below, before any update
                except Exception as e:
                    error = e
                parallel.agree(error)
                logged = parallel.average_values(loss, {})[0]
                if not math.isfinite(logged):
                    finite = False
                    break
                grads = [p for p in chosen.values() if p.grad is not None]  # the same on every rank (same code path)
                used = used or sum(p.numel() for p in grads)
                parallel.average_gradients(grads)
                torch.nn.utils.clip_grad_norm_(list(chosen.values()), cfg.grad_clip or math.inf)
                optimizer.step()
                scheduler.step()
                tokens += tokens_of[j]
                done += 1
                if bar is not None:
                    bar.set_postfix({"loss": f"{logged:.4g}"}, refresh=False)
                    bar.update(1)
            if not finite or timed_out:
                break
    finally:
        if bar is not None:
            bar.close()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    trained = (mean_loss() if done else loss_before) if finite else math.nan
    kept = not (math.isfinite(trained) and trained <= loss_before)
    if kept:
        with torch.no_grad():
            for k, p in chosen.items():
                p.copy_(saved[k])
    return BlockRecord(name, used, loss_before, loss_before if kept else trained, kept, trained, done, seconds, tokens,
                       timed_out)

