"""The planning side of a format: a `Family` (its policy `Choice`, candidates, error estimates, data-aware
fit) registered by kind. The planner, the policies and `explain` ask this registry; nothing switches on kinds.

Adding a format is three files: ``formats/<fmt>.py`` (spec, fit, module; `register_format`),
optionally ``codegen/ops/<fmt>.py`` (its op), and ``planning/families/<fmt>.py`` (a `Choice` subclass
and a `Family` subclass, ``register_family(MyFamily())``). See ``docs/formats.md``.

Precision (bits per stored value) will be a second axis of every candidate: `structures` gives a
format's structure candidates and the generic layer (`kronc.planning.candidates.site_candidates`)
prices them; that layer is where each structure will be crossed with the allowed precisions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from ...formats import Factorized, FormatError, FormatSpec, Shape, fit, format_module
from ...values import Precision
from ..options import SearchOptions

if TYPE_CHECKING:  # typing only: the estimate module imports this one
    from ..estimate import SiteAnalysis


def _keep_dtype() -> list[Literal["keep"] | Precision]:
    return ["keep"]


class Choice(BaseModel):
    """What a policy rule allows of one format: a set of specs the planner searches (tagged by ``kind``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    kind: str
    precisions: list[Literal["keep"] | Precision] = Field(default_factory=_keep_dtype, min_length=1)
    """Precisions of the stored values to search, crossed with every structure (``keep`` keeps the
    weight's dtype; e.g. ``{dtype: int4, group_size: 32}``). A precision a tensor of the site cannot
    take (a group size that does not divide) is skipped for that site; a site left with nothing is an
    error naming the site."""

    @model_validator(mode="after")
    def _rotation_where_taken(self) -> Choice:
        """A rotated precision (``rotate: true``) only for a format whose spec takes one (the dense weight)."""
        listed = [*self.precisions, *getattr(self, "bases", [])]
        rotated = [p.describe() for p in listed if isinstance(p, Precision) and p.rotate]
        if rotated:
            try:
                takes = format_module(self.kind).spec_type.rotates
            except FormatError:
                takes = False
            if not takes:
                raise ValueError(f"format {self.kind!r}: precision {rotated[0]} has rotate=true, which only the dense "
                                 "format's weight takes; use rotate=false here")
        return self

    def precision_note(self) -> str:
        """``""`` or `` @ keep,int8,int4g32``: the precisions part of `describe`."""
        if self.precisions == ["keep"]:
            return ""
        return " @ " + ",".join(p if isinstance(p, str) else p.describe() for p in self.precisions)

    def precision_list(self) -> list[Precision | None]:
        """`precisions` with ``keep`` as None (a spec's default precision)."""
        return [None if isinstance(p, str) else p for p in self.precisions]

    @property
    def identity(self) -> bool:
        """True when the choice allows only leaving the weight as it is (nothing to compress)."""
        return False

    def describe(self) -> str:
        """A short form for `kronc.explain`, e.g. ``lowrank(rank 1-max, x8)``."""
        return self.kind + self.precision_note()


class Family(ABC):
    """Everything the planner knows about one format kind."""

    kind: ClassVar[str]
    choice: ClassVar[type[Choice]]

    @abstractmethod
    def structures(self, shape: Shape, choice: Choice, options: SearchOptions) -> Iterable[FormatSpec]:
        """Every structure ``choice`` allows on a weight of ``shape`` (the generic layer prices and dedupes)."""

    @abstractmethod
    def errors(self, analysis: SiteAnalysis, specs: Sequence[FormatSpec]) -> list[float]:
        """Relative error of each spec's fit (`fit`) to the analysed weight, all at once."""

    screens: ClassVar[bool] = False
    """Whether `screen` gives rough errors (used to skip candidates that are clearly dominated)."""

    def screen(self, analysis: SiteAnalysis, specs: Sequence[FormatSpec]) -> list[float]:
        """Rough relative errors of ``specs``, much cheaper than `errors` (only with ``screens``)."""
        raise NotImplementedError

    def fit(self, weight: Tensor, spec: FormatSpec, moments: Tensor | None, damping: float) -> Factorized:
        """The fit whose error `errors` estimates (data-aware with input ``moments``; default: the format's fit)."""
        return fit(weight, spec)

    def uniform(self, shape: Shape, itemsize: int, cap: float, options: SearchOptions) -> list[FormatSpec]:
        """Specs storing at most ``cap`` bytes, one per structural variant (`kronc.planning.uniform_plan`)."""
        raise FormatError(f"format {self.kind!r} has no uniform setting")


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` (its format must be registered first: `kronc.formats.register_format`)."""
    format_module(family.kind)
    if family.choice.model_fields["kind"].default != family.kind:
        raise FormatError(f"{family.choice.__name__}.kind must default to {family.kind!r}")
    known = FAMILIES.get(family.kind)
    if known is not None and type(known) is type(family):
        return known
    if known is not None:
        raise FormatError(f"format kind {family.kind!r} already has the planning family {type(known).__name__}")
    FAMILIES[family.kind] = family
    return family


def family(kind: str) -> Family:
    try:
        return FAMILIES[kind]
    except KeyError:
        raise FormatError(f"no planning family for format kind {kind!r}; known: {', '.join(FAMILIES)}") from None


def choice_classes() -> tuple[type[Choice], ...]:
    return tuple(f.choice for f in FAMILIES.values())


def parse_choice(data: Any) -> Choice:
    """A choice from its dict form, by ``kind`` (a choice passes through)."""
    if isinstance(data, Choice):
        return data
    kind = data.get("kind") if isinstance(data, dict) else None
    return family(str(kind)).choice.model_validate(data)
