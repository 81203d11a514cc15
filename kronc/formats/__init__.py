"""Compression formats: one module each, one shared interface (`FormatSpec` + `Factorized`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, TypeAdapter
from torch import Tensor

from .base import Factorized, FormatError, FormatSpec, Shape
from .blocksparse import BlockSparse, BlockSparseSpec
from .dense import Dense, DenseSpec
from .doped import Doped, DopedSpec
from .kronecker import Kronecker, KroneckerSpec
from .lowrank import LowRank, LowRankSpec
from .sparse_index import SparseIndex, index_bytes
from .sparse_overlay import SparseOverlay

AnySpec = Annotated[
    DenseSpec | LowRankSpec | KroneckerSpec | DopedSpec | BlockSparseSpec, Field(discriminator="kind")
]
"""Any format spec, discriminated by its ``kind`` tag (for plans, policies and JSON)."""

FORMATS: dict[str, type[Factorized]] = {
    "dense": Dense,
    "lowrank": LowRank,
    "kronecker": Kronecker,
    "doped": Doped,
    "blocksparse": BlockSparse,
}

_SPEC_ADAPTER: TypeAdapter[AnySpec] = TypeAdapter(AnySpec)


def parse_spec(data: object) -> FormatSpec:
    """A spec from its dict/JSON form, e.g. ``{"kind": "lowrank", "rank": 8}``."""
    return _SPEC_ADAPTER.validate_python(data)  # type: ignore[return-value]


def fit(weight: Tensor, spec: FormatSpec) -> Factorized:
    """Fit ``spec``'s format to a dense ``(out, in)`` weight."""
    try:
        cls = FORMATS[spec.kind]
    except KeyError:
        raise FormatError(f"unknown format kind {spec.kind!r}; known: {', '.join(FORMATS)}") from None
    return cls.fit(weight, spec)


__all__ = [
    "FORMATS", "AnySpec", "BlockSparse", "BlockSparseSpec", "Dense", "DenseSpec", "Doped", "DopedSpec",
    "Factorized", "FormatError", "FormatSpec", "Kronecker", "KroneckerSpec", "LowRank", "LowRankSpec",
    "Shape", "SparseIndex", "SparseOverlay", "fit", "index_bytes", "parse_spec",
]
