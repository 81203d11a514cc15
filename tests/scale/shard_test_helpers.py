"""Helpers shared by the sharded-recovery tests (spawned gloo ranks read their outcomes as strings)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def outcome(fn: Callable[[], Any]) -> str:
    """``"ok"``, or the exception ``fn`` raised as ``"Type: message"``."""
    try:
        fn()
        return "ok"
    except Exception as e:  # noqa: BLE001 - the test reads each rank's outcome
        return f"{type(e).__name__}: {e}"


@contextmanager
def nan_loss_at(step: int) -> Iterator[None]:
    """Recovery whose ``step``-th loss (counted from 1) is NaN: the distiller is patched for the block."""
    from kronc.recover.losses import Distiller

    calls, losses = [0], Distiller.losses

    def poisoned(self: Distiller, batch: Any) -> dict[str, torch.Tensor]:
        calls[0] += 1
        parts = losses(self, batch)
        return {k: v * float("nan") for k, v in parts.items()} if calls[0] == step else parts

    Distiller.losses = poisoned  # type: ignore[method-assign]
    try:
        yield
    finally:
        Distiller.losses = losses  # type: ignore[method-assign]
