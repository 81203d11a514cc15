"""Splitting a streamed compile across ``torch.distributed`` ranks (launched with ``torchrun``).

Without an initialised process group every function here is the one-process identity, so the
streamed compile runs unchanged. With one:

* the error analysis of each block's sites is split round-robin over the ranks (`my_share`: site
  ``j`` of the block goes to rank ``j % world``) and the curves are gathered on every rank
  (`gather_dict`), so every rank solves the same knapsack on the same numbers: the same plan;
* the fits are split by block (`owns`: block ``i`` to rank ``i % world``, the rest to
  ``blocks % world``); each rank writes the shards of its blocks only, rank 0 the manifest (`save`);
* round-robin takes any world size: ranks beyond the number of blocks simply fit nothing.

Every exchange is an ``all_gather_object`` of ``(status, payload)``, barriers and broadcasts
included. A rank that raises sends ``("fail", message)`` in its next exchange (`fail`), which meets
the exchange the other ranks are waiting in; they raise `RankFailed` with its message, so the whole
job stops with the failing rank's error instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class RankFailed(RuntimeError):
    """Another rank of the job raised; the message is its error."""


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world() -> int:
    return torch.distributed.get_world_size() if active() else 1


def _exchange(status: str, payload: Any) -> list[Any]:
    if not active():
        return [payload]
    out: list[Any] = [None] * world()
    torch.distributed.all_gather_object(out, (status, payload))
    failed = [(r, p) for r, (s, p) in enumerate(out) if s == "fail"]
    if failed and status != "fail":
        r, message = failed[0]
        raise RankFailed(f"rank {r} of {world()} failed: {message}")
    return [p for _, p in out]


def fail(error: BaseException) -> None:
    """Tell the other ranks this one failed (once; errors that came from another rank are not sent back)."""
    if not active() or isinstance(error, RankFailed) or getattr(error, "_kronc_sent", False):
        return
    first = str(error).strip().splitlines()
    with contextlib.suppress(Exception):  # the group may be gone already; the local error is what matters
        error._kronc_sent = True  # type: ignore[attr-defined]  # an outer handler must not send it again
        _exchange("fail", f"{type(error).__name__}: {first[0] if first else ''}")


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` in the environment):
    NCCL when CUDA is available, else gloo. False (nothing done) for a single process or an initialised group."""
    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # NCCL exchanges objects through this device
        torch.distributed.init_process_group("nccl")
    else:
        torch.distributed.init_process_group("gloo")
    return True


@contextlib.contextmanager
def joined_from_env() -> Iterator[bool]:
    """`init_from_env` for a command's whole run; on leaving, the group is destroyed. After a normal end every
    rank first waits for the others (rank 0 may still be saving): a rank that closed its connections while a
    peer was still using the group could take that peer down with it."""
    global _left
    joined = init_from_env()
    try:
        yield joined
    except BaseException:
        if joined:
            torch.distributed.destroy_process_group()
            _left = True
        raise
    if joined:
        barrier()
        torch.distributed.destroy_process_group()
        _left = True


_left = False
"""Whether this process joined a torchrun group through `joined_from_env` and has left it."""


def left_group() -> bool:
    """Whether this process ran as a torchrun rank (`joined_from_env`) and has destroyed its group. Such a
    process should leave with ``os._exit`` once its output is flushed: on gloo, torch's process-group threads
    made the interpreter's normal teardown abort now and then ("terminate called without an active
    exception", SIGABRT, after every rank had finished and destroyed the group)."""
    return _left


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    return _exchange("ok", obj)[0]


def barrier() -> None:
    _exchange("ok", None)


def gather_list(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order."""
    return _exchange("ok", obj)


def gather_dict(part: dict[str, T]) -> dict[str, T]:
    """The union of every rank's dict (keys are disjoint by construction)."""
    merged: dict[str, T] = {}
    for d in gather_list(part):
        merged.update(d)
    return merged


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's items, round-robin."""
    return list(items[rank()::world()])


def owns(unit: int | None, count: int) -> bool:
    """Whether this rank fits and writes block ``unit`` (None: the rest, after the ``count`` blocks)."""
    return (count if unit is None else unit) % world() == rank()
