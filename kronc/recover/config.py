"""The recovery recipe is policy data: `RecoveryConfig` lives in `kronc.policies.recovery` (a policy
file carries it under ``recovery:``); re-exported here for the recovery modules."""

from __future__ import annotations

from ..policies.recovery import RecoveryConfig, RecoveryError, Trainable

__all__ = ["RecoveryConfig", "RecoveryError", "Trainable"]
