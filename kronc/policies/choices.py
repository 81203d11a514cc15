"""Format choices: which formats a policy rule allows for its sites, and within which limits.

A choice is a *set* of format specs (a search space); the planner enumerates it per site, prices
every candidate and picks one. Concrete specs live in `kronc.formats`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FactorShapes = Literal["auto"] | list[tuple[int, int]]


class _Choice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class DenseChoice(_Choice):
    """Leave the site dense."""

    kind: Literal["dense"] = "dense"
    """Format tag: ``dense`` keeps the weight as it is."""


class LowRankChoice(_Choice):
    """Truncated SVD ``U @ V``."""

    kind: Literal["lowrank"] = "lowrank"
    """Format tag: ``lowrank``."""
    rank_min: int = Field(default=1, ge=1)
    """Smallest rank considered."""
    rank_max: int | None = Field(default=None, ge=1)
    """Largest rank considered (default: the largest rank that still saves bytes)."""
    rank_multiple: int = Field(default=8, ge=1)
    """Only ranks that are multiples of this (plus ``rank_min``) are considered; 8 suits GPU tiles."""

    @model_validator(mode="after")
    def _ordered(self) -> LowRankChoice:
        if self.rank_max is not None and self.rank_max < self.rank_min:
            raise ValueError(f"rank_max ({self.rank_max}) must be >= rank_min ({self.rank_min})")
        return self


class KroneckerChoice(_Choice):
    """Sums of Kronecker products ``Σ A_r ⊗ B_r``."""

    kind: Literal["kronecker"] = "kronecker"
    """Format tag: ``kronecker``."""
    a_shapes: FactorShapes = "auto"
    """Shapes ``(m1, n1)`` of the first factor, or ``auto`` for every divisor pair of the weight's
    shape whose two factors are both at least ``min_factor`` on each side."""
    min_factor: int = Field(default=2, ge=1)
    """With ``a_shapes: auto``, the smallest side either factor may have."""
    terms_max: int = Field(default=4, ge=1)
    """Largest number of Kronecker terms summed; every count from 1 to this is considered."""


class DopedChoice(_Choice):
    """A structured base plus a sparse overlay of the residual's largest entries."""

    kind: Literal["doped"] = "doped"
    """Format tag: ``doped``."""
    base: Literal["kronecker", "lowrank", "none"] = "kronecker"
    """Structured part: Kronecker (doped Kronecker), low rank, or none (unstructured pruning)."""
    density_min: float = Field(default=0.001, gt=0, le=1)
    """Smallest overlay density considered."""
    density_max: float = Field(default=0.05, gt=0, le=1)
    """Largest overlay density considered (densities that store no fewer bytes than dense are skipped:
    with a bitmap index that is about 0.97 for float32 values, 0.94 for bfloat16)."""
    densities: int = Field(default=8, ge=1)
    """How many densities to try, spaced geometrically from ``density_min`` to ``density_max``."""
    a_shapes: FactorShapes = "auto"
    """Kronecker base only: factor shapes, as in ``kronecker``."""
    min_factor: int = Field(default=2, ge=1)
    """Kronecker base only: as in ``kronecker``."""
    terms_max: int = Field(default=2, ge=1)
    """Kronecker base only: largest number of terms in the base."""
    rank_multiple: int = Field(default=8, ge=1)
    """Low-rank base only: ranks considered are multiples of this."""

    @model_validator(mode="after")
    def _ordered(self) -> DopedChoice:
        if self.density_max < self.density_min:
            raise ValueError(f"density_max ({self.density_max}) must be >= density_min ({self.density_min})")
        return self


class BlockSparseChoice(_Choice):
    """Keep the blocks with the largest norms."""

    kind: Literal["blocksparse"] = "blocksparse"
    """Format tag: ``blocksparse``."""
    blocks: list[tuple[int, int]] = Field(default_factory=lambda: [(32, 32), (16, 16)])
    """Block shapes (rows, cols) to try; a shape that does not divide a weight is skipped for it."""
    density_min: float = Field(default=0.02, gt=0, le=1)
    """Smallest fraction of blocks kept."""
    density_max: float = Field(default=0.9, gt=0, le=1)
    """Largest fraction of blocks kept."""

    @model_validator(mode="after")
    def _ordered(self) -> BlockSparseChoice:
        if self.density_max < self.density_min:
            raise ValueError(f"density_max ({self.density_max}) must be >= density_min ({self.density_min})")
        return self


FormatChoice = Annotated[
    DenseChoice | LowRankChoice | KroneckerChoice | DopedChoice | BlockSparseChoice,
    Field(discriminator="kind"),
]
"""Any format choice, tagged by ``kind``."""

PRUNING = DopedChoice(base="none", density_min=0.02, density_max=0.9, densities=12)
"""Unstructured pruning (a doped format with no base, entries ranked per output row) from 2% to 90%
of the entries kept."""

ALL_FORMATS: tuple[FormatChoice, ...] = (
    DenseChoice(),
    LowRankChoice(),
    KroneckerChoice(),
    DopedChoice(),
    BlockSparseChoice(),
    PRUNING,
)
"""What a site may use when no rule narrows it: every format with default limits, dense included, so
the solver can leave the layers that compress worst alone."""

DATA_FORMATS: tuple[FormatChoice, ...] = (DenseChoice(), PRUNING)
"""The default formats of a ``data`` objective policy: dense and unstructured pruning at any density.

Measured on SmolLM2-135M (calibration on King James text, perplexity on ABC news, 8 windows of 512
tokens, training-free): the data-aware estimates of the other formats are right about the
calibration text (planned with every format, the 2x and 4x plans mix low rank into about half the
sites and reach a lower King James loss than pruning alone) but low-rank fits to King James
activations transfer badly to news (4x: perplexity 1.7 million with them, 9,500 without), and
Kronecker, doped Kronecker and block-sparse plans are never chosen or lose by orders of magnitude.
Leaving them out also makes the analysis several times faster. Name other formats in
``default_formats`` or in rules to search them."""
