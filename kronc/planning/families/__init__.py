"""Planning families, one file per format: its policy choice, candidates, error estimate and fit.

Importing this package registers the built-in families (a new format's family file calls
`register_family` itself); `base` holds the registry and the interface.
"""

from __future__ import annotations

from . import blocksparse, dense, doped, kronecker, lowrank
from .base import FAMILIES, Choice, Family, choice_classes, family, parse_choice, register_family
from .blocksparse import BlockSparseChoice, BlockSparseFamily
from .dense import DenseChoice, DenseFamily
from .doped import PRUNING, DopedChoice, DopedFamily
from .kronecker import KroneckerChoice, KroneckerFamily
from .lowrank import LowRankChoice, LowRankFamily

for _builtin in (DenseFamily(), LowRankFamily(), KroneckerFamily(), DopedFamily(), BlockSparseFamily()):
    register_family(_builtin)  # in this order: the order policies and messages list them

from . import quantlr  # noqa: E402  (registers itself, after the built-ins: the joint format)
from .quantlr import QuantLowRankChoice  # noqa: E402

__all__ = [
    "FAMILIES", "PRUNING", "BlockSparseChoice", "Choice", "DenseChoice", "DopedChoice", "Family", "KroneckerChoice",
    "LowRankChoice", "QuantLowRankChoice", "blocksparse", "choice_classes", "dense", "doped", "family", "kronecker", "lowrank",
    "parse_choice", "quantlr", "register_family",
]
