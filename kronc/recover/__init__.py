"""Recovery: train a compressed model back toward its dense original by knowledge distillation.

::

    small = kronc.compile(model, budget="4x")
    result = kronc.recover(small, model, text, tokenizer=tok, steps=200)   # trains `small` in place
    print(result, result.series("kd")[-1])

`recover` distils output logits (KL at a temperature), intermediate hidden states (KnGPT2's ILKD)
and optionally the plain next-token loss, with the weights and schedule of a `RecoveryConfig`
(which a policy file can carry under ``recovery:``). Training schemes (`kronc.recover.schemes`)
plug in through the `Scheme` hooks.

Only `RecoveryConfig` and `RecoveryError` load eagerly (plain pydantic, so `kronc.policies` can
import them without a cycle); the rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import RecoveryConfig, RecoveryError, Trainable

if TYPE_CHECKING:
    from .loop import recover, recovery_losses
    from .result import RecoveryResult, StepRecord
    from .schemes.base import Scheme

_LAZY = {
    "recover": ".loop",
    "recovery_losses": ".loop",
    "RecoveryResult": ".result",
    "StepRecord": ".result",
    "Scheme": ".schemes.base",
}

__all__ = ["RecoveryConfig", "RecoveryError", "RecoveryResult", "Scheme", "StepRecord", "Trainable", "recover",
           "recovery_losses"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
