"""Data-parallel end-to-end distillation under an initialised ``torch.distributed`` process group.

Every rank runs the same loop on the same batch stream (same seed), takes its own equal slice of each
batch's rows, back-propagates, and the gradients are averaged across ranks (``all_reduce``; the slices are
equal): for losses that are means over tokens (KD, next-token cross-entropy) the
step is that of one process on the whole batch, up to the order of floating-point sums. This is the
gradient averaging `DistributedDataParallel` does, without its wrapper: the distiller's hooks and the
scheme hooks see the student itself, and no parameter has to be used in every forward. The loss values
are averaged too, so every rank logs the same history and a NaN stops every rank at the same step.
The hidden-state loss is a ratio per batch, so with it the ranks average per-slice ratios (a slightly
different estimate of the same quantity).

A batch whose rows do not split evenly over the ranks is refused in one line before training.

Block-wise reconstruction (`kronc.recover.blockwise`) uses the same helpers: each rank caches its slice of
the calibration batches, every block step averages the block's gradients (`average_gradients`) and its
losses (`mean_over_ranks`), so the keep-or-revert decision and a time limit (`any_rank`) agree on every
rank; `shared_failures` sends a rank's error to the others and `write_then_wait` lets rank 0 alone write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..scale import distributed as dist
from .batches import Batch
from .config import RecoveryError


def active() -> bool:
    return dist.active() and dist.world() > 1


def check_rows(rows: int, what: str = "the batch") -> None:
    """`RecoveryError` when ``rows`` does not split evenly over the ranks."""
    if active() and rows % dist.world():
        raise RecoveryError(f"{what} has {rows} rows, which do not split evenly over {dist.world()} ranks: use a batch_size "
                            f"that is a multiple of {dist.world()} (data-parallel recovery gives each rank an equal slice)")


def shard(batch: Batch, what: str = "the batch") -> Batch:
    """This rank's rows of ``batch`` (every tensor sliced on its first dimension)."""
    if not active():
        return batch
    rows = _rows(batch)
    check_rows(rows, what)
    n, r = rows // dist.world(), dist.rank()

    def cut(x: Any) -> Any:
        return x[r * n:(r + 1) * n] if isinstance(x, Tensor) and x.dim() and x.shape[0] == rows else x

    return Batch(tuple(cut(a) for a in batch.args), {k: cut(v) for k, v in batch.kwargs.items()}, cut(batch.targets),
                 cut(batch.mask), batch.tokens // dist.world())


def _rows(batch: Batch) -> int:
    for x in (*batch.args, *batch.kwargs.values(), batch.targets):
        if isinstance(x, Tensor) and x.dim():
            return int(x.shape[0])
    raise RecoveryError("data-parallel recovery needs batches with a tensor input to split by rows")


def agree(error: BaseException | None) -> None:
    """The step's outcome, exchanged once per training step before its first other collective: when a rank
    raised, it raises its error and every other rank `RankFailed` with that error's message, instead of
    waiting for it in the step's next ``all_reduce``. In one process: ``error`` is raised as it is."""
    if error is not None and not active():
        raise error
    if not active():
        return
    t = torch.tensor([int(error is not None)], dtype=torch.int64, device=_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    if not int(t[0]):
        return
    if error is not None:
        dist.fail(error)  # the others gather the message in `barrier`
        raise error
    dist.barrier()  # raises RankFailed with the failing rank's message


def average_gradients(params: list[nn.Parameter]) -> None:
    """Sum the ranks' gradients and divide by the number of ranks (equal slices: the whole batch's mean)."""
    if not active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
    torch.distributed.all_reduce(flat)
    flat /= dist.world()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p))  # type: ignore[union-attr]
        offset += n


def average_values(total: Tensor, values: dict[str, float]) -> tuple[float, dict[str, float]]:
    """The loss and its parts averaged over the ranks (what every rank logs and checks for NaN)."""
    loss = float(total.detach())
    if not active():
        return loss, values
    keys = sorted(values)
    t = torch.tensor([loss, *(values[k] for k in keys)], dtype=torch.float64, device=total.device)
    torch.distributed.all_reduce(t)
    t /= dist.world()
    return float(t[0]), {k: float(v) for k, v in zip(keys, t[1:].tolist(), strict=True)}


def is_writer() -> bool:
    """Whether this rank writes checkpoints (rank 0, or the only process)."""
    return dist.rank() == 0


def mean_over_ranks(value: float) -> float:
    """``value`` averaged over the ranks (itself in one process): a loss every rank then decides on alike."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(t)
    return float(t[0] / dist.world())


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on some rank (a per-rank clock must not split the ranks' loops)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t[0])


def _device() -> torch.device:
    """Where a collective's tensor must live: this rank's GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def write_then_wait(write: Callable[[], Any]) -> None:
    """Rank 0 runs ``write``; every rank then meets at a barrier (which also carries a rank's failure)."""
    if is_writer():
        write()
    dist.barrier()


@contextmanager
def shared_failures() -> Iterator[None]:
    """An exception raised inside is sent to the other ranks (`kronc.scale.distributed.fail`) before it
    propagates, so they stop with its message at their next exchange instead of waiting for this rank."""
    try:
        yield
    except Exception as e:
        dist.fail(e)
        raise
