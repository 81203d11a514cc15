"""Format choices in policies: which formats a rule allows for its sites, and within which limits.

A choice is a *set* of format specs (a search space); the planner enumerates it per site, prices
every candidate and picks one. Each format's choice class lives with its planning family
(`kronc.planning.families`); `FormatChoice` reads any registered one by its ``kind`` tag, so a
format registered later (``register_family``) is accepted by policies without edits here.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, GetCoreSchemaHandler, GetJsonSchemaHandler, ValidationError
from pydantic_core import core_schema

from ..planning.families import FAMILIES as _FAMILIES  # noqa: N811
from ..planning.families import (
    PRUNING,
    BlockSparseChoice,
    Choice,
    DenseChoice,
    DopedChoice,
    KroneckerChoice,
    LowRankChoice,
    QuantLowRankChoice,
    choice_classes,
    parse_choice,
)
from ..values import Precision

__all__ = [
    "ALL_FORMATS", "DATA_FORMATS", "DEFAULT_PRECISIONS", "PRUNING", "QUANT_DENSE", "BlockSparseChoice", "Choice", "DenseChoice", "DopedChoice",
    "FormatChoice", "KroneckerChoice", "LowRankChoice",
]


def parse_tagged(data: Any) -> Choice:
    """`parse_choice` with the errors a pydantic tagged union gives: an unknown or missing ``kind`` is
    ``union_tag_invalid`` / ``union_tag_not_found``, a bad field sits under the tag (``lowrank.rank_min``)."""
    if isinstance(data, Choice):
        return data
    kind = data.get("kind") if isinstance(data, dict) else None
    tags = ", ".join(f"'{k}'" for k in _FAMILIES)
    if kind is None:
        raise ValidationError.from_exception_data(
            "FormatChoice", [{"type": "union_tag_not_found", "loc": (), "input": data, "ctx": {"discriminator": "'kind'"}}]
        )
    if not isinstance(kind, str) or kind not in _FAMILIES:  # a list or dict tag is unhashable: invalid too
        raise ValidationError.from_exception_data("FormatChoice", [{
            "type": "union_tag_invalid", "loc": (), "input": data,
            "ctx": {"discriminator": "'kind'", "tag": str(kind), "expected_tags": tags},
        }])
    try:
        return parse_choice(data)
    except ValidationError as e:
        errors = [{"type": err["type"], "loc": (kind, *err["loc"]), "input": err["input"], **({"ctx": err["ctx"]} if "ctx" in err else {})}
                  for err in e.errors()]
        raise ValidationError.from_exception_data("FormatChoice", errors) from None  # type: ignore[arg-type]


def tagged_union() -> Any:
    """The registered choices as a discriminated union type (for `kronc.policies.diagnostics` key paths)."""
    return Annotated[Union[choice_classes()], Field(discriminator="kind")]  # noqa: UP007


class ChoiceByKind:
    """Pydantic hook: validate a choice by its ``kind`` against the family registry (errors keep their key
    paths), dump it with its own fields, and describe every registered choice in the JSON schema."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            parse_tagged,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda c, info: c.model_dump(mode=info.mode), info_arg=True
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        members = [handler(c.__pydantic_core_schema__) for c in choice_classes()]
        for member in members:  # the tag is required in files (as pydantic marks it for a tagged union)
            body = handler.resolve_ref_schema(member)
            body["required"] = ["kind", *[k for k in body.get("required", []) if k != "kind"]]
        mapping = {c.model_fields["kind"].default: m["$ref"] for c, m in zip(choice_classes(), members, strict=True) if "$ref" in m}
        out: dict[str, Any] = {"oneOf": members}
        if len(mapping) == len(members):
            out["discriminator"] = {"propertyName": "kind", "mapping": mapping}
        return out


FormatChoice = Annotated[Choice, ChoiceByKind]
"""Any registered format choice, tagged by ``kind``."""

DEFAULT_PRECISIONS: tuple[Precision, ...] = (
    Precision(dtype="bf16"),
    Precision(dtype="int8"),
    *(Precision(dtype="int4", group_size=g, fit="hqq") for g in (32, 64, 128)),
    *(Precision(dtype="int4", group_size=g, symmetric=False, fit="hqq") for g in (64, 128)),
    *(Precision(dtype="int3", group_size=g, symmetric=False, fit="hqq") for g in (32, 64, 128)),
    *(Precision(dtype="int2", group_size=g, symmetric=False, fit="hqq") for g in (32, 64)),
    *(Precision(dtype="int4", group_size=g, symmetric=False, fit="gptq", rotate=True) for g in (64, 128, None)),
    *(Precision(dtype="int3", group_size=g, symmetric=False, fit="gptq", rotate=True) for g in (32, 64, 128, None)),
)
"""Precisions the default policy searches for dense weights. Generic grounds, not one model's grid:
bf16 and per-row int8 are near-lossless for any trained weight; unrotated int4/int3/int2 need group
scales, and groups of 32-128 span the usual trade of scale bytes (0.125-0.5 bit per value) against range; at 3
bits and below an asymmetric grid (an fp16 minimum per group) is used because a symmetric one spends
a level on zero and only has 3 or 1 levels per side; the data-free clip/HQQ fit because clipping
the range pays at 4 bits and below. int4 comes both symmetric and asymmetric (groups of 64 and 128,
not 32, the packaged SmolLM2 grid): at the same bytes as symmetric groups of 32, asymmetric groups of
64 are the better uniform int4 on both SmolLM2 and MiniLM (``benchmarks/results/quality_quant.md``),
and with them kronc's 8x plan of SmolLM2 went from 54.3 to 51.9 perplexity. The GPTQ fit is not a
default: with its int3/int2 precisions at ``gptq`` (10% damping) the same 8x plan scored 64.2 on ABC
news; fitted to King James calibration, it transfers worse to other text. Rotated (``rotate``, the
dense weight stored as ``W R``), GPTQ does transfer: uniform int3g64a-gptq at 10% damping on SmolLM2
scored 66.2 on ABC news (2.0x dense) against 268 unrotated and 187 for the rotated data-free fit, and
17.0 against 38.8 on held-out King James (``benchmarks/results/rotation.md``); on MiniLM rotation tied
or helped at 3 bits and lowered the calibration output error. So int3 comes rotated with GPTQ as well
(the planner estimates it by GPTQ on sampled rows, held out across two calibration folds; without
calibration data the fit falls back to the data-free one), also with one scale per row
(``int3a-gptq-rot``, 3.02-3.08 bits): the rotation evens out each row, so a row-wide range costs far
less than it would unrotated, and it is the step between 3.25-3.5 bits (groups of 128/64) and int2
(2.5-3 bits) that 10x plans need. Without it SmolLM2's 10x plan put 37 sites at int2 (ABC perplexity
124 against 66.9 for uniform rotated int3 at 9.14x; the planner had estimated those sites' damage
correctly, they were its only cheaper step); with it, 94.1 (``benchmarks/results/int2_diagnosis.md``).
Rotated int4 with the GPTQ fit (groups of 64/128 and one scale per row, asymmetric) is a default too:
on SmolLM2 uniform int4g64a-gptq-rot scored 37.67 ABC perplexity at 7.11x (1.14x dense) against 42.91
for the best unrotated int4 at those bytes, and one scale per row 41.77 at 7.91x; with them kronc's 8x plan
went from 50.35 to 43.18, and MiniLM's from 0.632 to 0.653 Lee Pearson (dense 0.656; rotated int4 with the
data-free fit had been a wash). Rotated int2 is not a default: rotation lowered its output error but
made perplexity worse on both models."""

QUANT_DENSE = DenseChoice(precisions=list(DEFAULT_PRECISIONS))
"""Dense weights at the `DEFAULT_PRECISIONS` (the plain dense choice keeps the weight as it is)."""

ALL_FORMATS: tuple[Choice, ...] = (
    DenseChoice(),
    QUANT_DENSE,
    LowRankChoice(),
    KroneckerChoice(),
    DopedChoice(),
    BlockSparseChoice(),
    PRUNING,
    QuantLowRankChoice(),
)
"""What a site may use when no rule narrows it: every built-in format with default limits, dense included, so
the solver can leave the layers that compress worst alone. A format registered later is opt-in (named in a rule)."""

DATA_FORMATS: tuple[Choice, ...] = (DenseChoice(), QUANT_DENSE, PRUNING)
"""The default formats of a ``data`` objective policy: dense and unstructured pruning at any density.

Why: fits to calibration activations of the other formats transfer badly to other text, and
leaving them out makes the analysis several times faster (the measurement: ``benchmarks/results/design_measurements.md``,
"data-objective defaults"). Name other formats in
``default_formats`` or in rules to search them."""
