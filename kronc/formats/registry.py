"""The format registry: every format kind, its spec class and its `Factorized` module, in one table.

A format registers itself where it is defined (``register_format(MySpec, MyFactorized)`` at the end
of its module); plans, saved models and the planner find it here by its ``kind`` tag, so nothing
else switches on kinds. Registering the same classes again is a no-op; another class under a taken
kind is an error.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import PlainSerializer, PlainValidator, SerializationInfo, ValidationError, WithJsonSchema
from pydantic_core import PydanticCustomError
from torch import Tensor

from .base import Factorized, FormatError, FormatSpec, Shape

FORMATS: dict[str, type[Factorized]] = {}
"""Format kind -> its `Factorized` module class (its spec class is ``cls.spec_type``)."""


def register_format(module: type[Factorized]) -> type[Factorized]:
    """Add ``module`` (a `Factorized` subclass whose ``spec_type`` has a ``kind`` default) to the registry."""
    kind = module.spec_type.model_fields["kind"].default
    if not isinstance(kind, str) or not kind:
        raise FormatError(f"{module.spec_type.__name__}.kind needs a string default (the format's tag)")
    known = FORMATS.get(kind)
    if known is not None and known is not module:
        raise FormatError(f"format kind {kind!r} is taken by {known.__name__}; pick another kind for {module.__name__}")
    FORMATS[kind] = module
    return module


def format_module(kind: str) -> type[Factorized]:
    """The `Factorized` class of ``kind`` (`FormatError` naming the known kinds when there is none)."""
    try:
        return FORMATS[kind]
    except KeyError:
        raise FormatError(f"unknown format kind {kind!r}; known: {', '.join(FORMATS)}") from None


def parse_spec(data: object) -> FormatSpec:
    """A spec from its dict/JSON form, e.g. ``{"kind": "lowrank", "rank": 8}`` (a spec passes through)."""
    if isinstance(data, FormatSpec):
        return data
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in FORMATS:
        what = "a format spec needs a 'kind'" if kind is None else f"unknown format kind {kind!r}"
        error = PydanticCustomError("unknown_kind", "{what}; known: {known}", {"what": what, "known": ", ".join(FORMATS)})
        raise ValidationError.from_exception_data("FormatSpec", [{"type": error, "loc": ("kind",), "input": data}])
    return FORMATS[kind].spec_type.model_validate(data)


def fit(weight: Tensor, spec: FormatSpec) -> Factorized:
    """Fit ``spec``'s format to a dense ``(out, in)`` weight."""
    return format_module(spec.kind).fit(weight, spec)


def empty(spec: FormatSpec, shape: Shape, dtype: torch.dtype = torch.float32) -> Factorized:
    """A module of ``spec``'s structure for a ``shape`` weight with uninitialised values (for loading)."""
    spec.check(shape)
    return format_module(spec.kind).empty(spec, shape, dtype)


def _dump(spec: FormatSpec, info: SerializationInfo) -> Any:
    return spec.model_dump(mode=info.mode)


AnySpec = Annotated[
    FormatSpec,
    PlainValidator(parse_spec),
    PlainSerializer(_dump),
    WithJsonSchema({"type": "object", "required": ["kind"], "description": "A format spec, tagged by kind."}),
]
"""Any registered format's spec, read by its ``kind`` tag (for plans and JSON)."""
