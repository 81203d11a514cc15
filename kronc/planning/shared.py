"""Work done once per input Gram matrix and shared by the analyses of every site that reads that input.

Calibration gives sites that read the same tensor (q/k/v, gate/up) the same moments object
(`calibrate.collect_input_moments`), so the planner keys such work (GPTQ's damped inverse Cholesky
factor and the rotated Gram matrix, per calibration fold) by the identity of that object: computed once,
used by all of them. Thread-safe (sites are analysed on worker threads); one per `make_plan` call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

from torch import Tensor


class PerInput:
    """``get(kind, source, compute)``: ``compute()`` once per ``kind`` and ``source`` tensor object."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[Hashable, int], tuple[Tensor, threading.Lock, list[Any]]] = {}

    def get(self, kind: Hashable, source: Tensor, compute: Callable[[], Any]) -> Any:
        with self._lock:  # the entry keeps ``source`` alive, so its id is not reused while it is here
            entry = self._items.setdefault((kind, id(source)), (source, threading.Lock(), []))
        with entry[1]:
            if not entry[2]:
                entry[2].append(compute())
            return entry[2][0]
