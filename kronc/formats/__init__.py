"""Compression formats: one module each, one shared interface (`FormatSpec` + `Factorized`), one registry.

Each format module registers itself (`registry.register_format`); `parse_spec`, `fit` and `empty`
find a format by its ``kind`` tag. See ``docs/formats.md`` for adding one.
"""

from __future__ import annotations

from .base import Factorized, FormatError, FormatSpec, Shape
from .blocksparse import BlockSparse, BlockSparseSpec
from .dense import Dense, DenseSpec
from .doped import Doped, DopedSpec
from .kronecker import Kronecker, KroneckerSpec
from .lowrank import LowRank, LowRankSpec
from .quantlr import QuantLowRank, QuantLowRankSpec
from .registry import FORMATS, AnySpec, empty, fit, format_module, parse_spec, register_format
from .sparse_index import SparseIndex, index_bytes
from .sparse_overlay import SparseOverlay

__all__ = [
    "FORMATS", "AnySpec", "BlockSparse", "BlockSparseSpec", "Dense", "DenseSpec", "Doped", "DopedSpec",
    "Factorized", "FormatError", "FormatSpec", "Kronecker", "KroneckerSpec", "LowRank", "LowRankSpec", "QuantLowRank", "QuantLowRankSpec",
    "Shape", "SparseIndex", "SparseOverlay", "empty", "fit", "format_module", "index_bytes", "parse_spec",
    "register_format",
]
