"""torch single-threaded for a block of work, the caller's thread count restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded() -> Iterator[None]:
    """``torch.set_num_threads(1)`` inside the block (nothing when it already is), the previous count after it.

    Used where kronc runs its own worker threads (each torch op on one thread, so workers do not oversubscribe
    the cores) and where a LAPACK routine rounds with the thread count (`kronc.values.gptq.gptq_hinv`)."""
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
