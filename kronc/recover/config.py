"""The recovery recipe is policy data: `RecoveryConfig` (and its block-wise settings, `BlockwiseConfig`)
lives in `kronc.policies.recovery` (a policy file carries it under ``recovery:``); re-exported here for
the recovery modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..policies.recovery import BlockwiseConfig, RecoveryConfig, RecoveryError, Trainable

__all__ = ["BlockwiseConfig", "RecoveryConfig", "RecoveryError", "Trainable", "make_config"]


def make_config(config: RecoveryConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> RecoveryConfig:
    """The recipe a recovery call runs: ``config`` (a `RecoveryConfig`, a dict of its fields or None for the
    defaults) with keyword ``overrides`` replacing single fields, validated as a whole."""
    if config is None:
        base: dict[str, Any] = {}
    elif isinstance(config, RecoveryConfig):
        base = config.model_dump()
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise RecoveryError(f"config must be a RecoveryConfig or a dict of its fields, got {type(config).__name__}")
    return RecoveryConfig.model_validate({**base, **overrides})
