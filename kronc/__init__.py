"""kronc: compress neural language models by rewriting their compute graph.

The pipeline, each stage callable alone::

    captured = kronc.capture(model)              # fx / torch.export graph + compressible sites
    plan = kronc.plan(captured, policy, budget=)  # one format per site under the budget
    small = kronc.apply(captured, plan)           # fit the formats, rewrite the model

`kronc.compile` is those three calls in a row.
"""

from __future__ import annotations

from .api import CompileReport, apply, compile, plan
from .budget import Budget, BudgetError
from .capture import Captured, CaptureError, capture
from .formats import (
    BlockSparseSpec,
    DenseSpec,
    DopedSpec,
    FormatError,
    FormatSpec,
    KroneckerSpec,
    LowRankSpec,
)
from .inputs import InputError
from .modules import CompressedEmbedding, CompressedLinear, CompressedLSTM
from .plan import Decision, Plan
from .policies import Policy, PolicyError, explain, load_policy
from .recover import RecoveryConfig, recover
from .serialize import KroncFileError, load, save
from .sites import Site

__version__ = "0.1.0"

__all__ = [
    "BlockSparseSpec", "Budget", "BudgetError", "CaptureError", "Captured", "CompileReport", "CompressedEmbedding",
    "CompressedLSTM", "CompressedLinear", "Decision", "DenseSpec", "DopedSpec", "FormatError", "FormatSpec",
    "InputError", "KroncFileError", "KroneckerSpec", "LowRankSpec", "Plan", "Policy", "PolicyError", "RecoveryConfig", "Site",
    "__version__", "apply", "capture", "compile", "explain", "load", "load_policy", "plan", "recover", "save",
]

from .integrations import torch_compile as _torch_compile  # noqa: E402, F401  (registers torch.compile(backend="kronc"))
