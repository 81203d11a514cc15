"""Recovery: train a compressed model back toward its dense original by knowledge distillation.

::

    small = kronc.compile(model, budget="4x")
    result = kronc.recover(small, model, text, tokenizer=tok, steps=200)   # trains `small` in place
    print(result, result.series("kd")[-1])

`recover` distils output logits (KL at a temperature), intermediate hidden states (KnGPT2's ILKD)
and optionally the plain next-token loss, with the weights and schedule of a `RecoveryConfig`
(which a policy file can carry under ``recovery:``). Training schemes (`kronc.recover.schemes`)
plug in through the `Scheme` hooks.
"""

from __future__ import annotations

from .config import RecoveryConfig, RecoveryError, Trainable
from .entry import recover
from .loop import recovery_losses
from .result import RecoveryResult, StepRecord
from .schemes.base import Scheme

__all__ = ["RecoveryConfig", "RecoveryError", "RecoveryResult", "Scheme", "StepRecord", "Trainable", "recover",
           "recovery_losses"]
