"""kronc: compress neural language models by rewriting their compute graph.

The pipeline, each stage callable alone::

    captured = kronc.capture(model)              # fx / torch.export graph + compressible sites
    plan = kronc.plan(captured, policy, budget=)  # one format per site under the budget
    small = kronc.apply(captured, plan)           # fit the formats, rewrite the model

`kronc.compile` is those three calls in a row. ``import kronc`` registers the ``kronc::`` ops and nothing
else; ``kronc.register_backend()`` adds ``torch.compile(backend="kronc")``.
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
from .integrations import register as register_backend
from .modules import CompressedEmbedding, CompressedLinear, CompressedLSTM
from .plan import Decision, Plan
from .policies import Policy, PolicyError, explain, load_policy
from .recover import RecoveryConfig, recover
from .serialize import KroncFileError, save
from .sites import Site
from .tools.resolve_model import load

__version__ = "0.1.0"

__all__ = [
    "BlockSparseSpec", "Budget", "BudgetError", "CaptureError", "Captured", "CompileReport", "CompressedEmbedding",
    "CompressedLSTM", "CompressedLinear", "Decision", "DenseSpec", "DopedSpec", "FormatError", "FormatSpec",
    "InputError", "KroncFileError", "KroneckerSpec", "LowRankSpec", "Plan", "Policy", "PolicyError", "RecoveryConfig",
    "Site", "__version__", "apply", "capture", "compile", "explain", "load", "load_policy", "plan", "recover",
    "register_backend", "save",
]
