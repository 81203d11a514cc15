"""Compression policies: budget, scope, ordered rules and format choices, loaded from files.

See `kronc.policies.model` for the precedence rules and `kronc.policies.patterns` for pattern syntax.
"""

from __future__ import annotations

from .choices import (
    ALL_FORMATS,
    DATA_FORMATS,
    PRUNING,
    BlockSparseChoice,
    DenseChoice,
    DopedChoice,
    FormatChoice,
    KroneckerChoice,
    LowRankChoice,
)
from .errors import PolicyError, PolicyWarning, Problem
from .explain import Explanation, describe_choice, explain
from .loader import dump_policy, dumps_policy, list_policies, load_policy, policy_data, validate_policy
from .match import Resolution, SiteResolution, in_scope, resolve
from .model import Policy, Rule, Scope, SolverOptions
from .patterns import pattern_matches

__all__ = [
    "ALL_FORMATS", "DATA_FORMATS", "PRUNING", "BlockSparseChoice", "DenseChoice", "DopedChoice", "Explanation", "FormatChoice",
    "KroneckerChoice", "LowRankChoice", "Policy", "PolicyError", "PolicyWarning", "Problem", "Resolution",
    "Rule", "Scope", "SiteResolution", "SolverOptions", "describe_choice", "dump_policy", "dumps_policy",
    "explain", "in_scope", "list_policies", "load_policy", "pattern_matches", "policy_data", "resolve",
    "validate_policy",
]
