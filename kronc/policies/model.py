"""The policy model: what to compress, into which formats, under which budget.

A policy is plain data (load it from YAML, TOML or JSON with `kronc.load_policy`, or build it in
Python). For each site (compressible weight) of a model it answers two questions, after a first
one: **is the site fixed?** The first `Policy.fixed` entry with a pattern matching the site stores it
dense at that entry's precision, outside the budget; neither scope nor rules apply to it.

1. **Is the site in scope?** `Scope` decides, in this order: its kind must be listed in
   ``scope.kinds`` (embeddings are the exception: ``include_embeddings`` alone brings them in); an
   LM head (tag ``lm_head``) needs ``include_lm_head`` and an embedding table (kind ``embedding``
   or tag ``embedding``) needs ``include_embeddings`` (a tied embedding/LM head needs both); when
   ``scope.include`` is non-empty the site must match one of its patterns; and it must match none
   of ``scope.exclude``. Out-of-scope sites stay dense and do not count toward the budget.
2. **Which formats may it use?** Rules are tried **in the order written; the first rule with a
   pattern that matches the site wins**, whatever the pattern's syntax (an exact name does not
   outrank an earlier glob: write specific rules before general ones). Within one rule, any of
   its patterns matching is enough. In-scope sites that no rule matches may use
   ``default_formats``.

A rule whose formats are ``[{kind: dense}]`` keeps its sites dense but *in scope*: their dense
bytes still count in the budget's total (for a ratio budget, the other sites must then shrink
more). To leave sites out of the budget altogether, use ``scope.exclude``.

Patterns (see `kronc.policies.patterns`): an exact name; a glob with ``*``, ``?`` or ``[...]``
(``*`` crosses dots); or ``re:`` followed by a regex that must match the whole name. A pattern
matches a site when it matches its parameter name (``...q_proj.weight``), its module name
(``...q_proj``) or, for tied weights, an alias in either form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ..budget import Budget
from ..planning.families import Choice
from ..values import Precision
from .choices import ALL_FORMATS, DATA_FORMATS, DEFAULT_PRECISIONS, FormatChoice
from .patterns import check_pattern
from .recovery import RecoveryConfig

ScopeKind = Literal["linear", "conv1d", "functional", "lstm"]
"""Site kinds `Scope.kinds` can list: every `kronc.sites.SiteKind` except ``embedding``, which
``include_embeddings`` controls."""

MAX_RULES = 1000
"""Most rules in one policy (each site is tried against every rule's patterns)."""

BIT_WIDTHS = (2, 3, 4, 8, 16, 32)
GROUP_LIMITS = (16, 32, 64, 128, "row")
BitWidth = Literal[2, 3, 4, 8, 16, 32]
"""Bits per stored value a rule's ``bits`` can list (16: bf16/fp16; 32: fp32)."""
GroupLimit = Literal[16, 32, 64, 128, "row"]
"""Scale groupings a rule's ``group_sizes`` can list (``row``: one scale per row)."""

Pattern = Annotated[str, AfterValidator(check_pattern)]
"""A site name pattern: exact name, glob, or ``re:`` regex."""


def check_patterns(value: Any) -> Any:
    """A ``match`` value: one pattern or a non-empty list of them, each valid."""
    if isinstance(value, str):
        return check_pattern(value)
    if not isinstance(value, list):
        raise ValueError(f"expected a pattern or a list of patterns, got {value!r}")
    if not value:
        raise ValueError("needs at least one pattern")
    for i, p in enumerate(value):
        if not isinstance(p, str):
            raise ValueError(f"pattern [{i}] must be a string, got {p!r}")
        check_pattern(p)
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


def _default_kinds() -> list[ScopeKind]:
    return ["linear", "conv1d", "functional", "lstm"]


class Scope(_Model):
    """Which sites take part in compression (and in the budget's total)."""

    kinds: list[ScopeKind] = Field(default_factory=_default_kinds)
    """Kinds of site in scope: ``linear`` (nn.Linear), ``conv1d`` (Hugging Face Conv1D),
    ``functional`` (F.linear on a parameter), ``lstm`` (nn.LSTM gate matrices). Embedding tables
    are brought in by ``include_embeddings`` instead."""
    include_embeddings: bool = False
    """Compress embedding tables too (kind ``embedding`` or tag ``embedding``)."""
    include_lm_head: bool = False
    """Compress the LM head too (tag ``lm_head``). A head tied to the embedding is one site, in
    scope only when both ``include_embeddings`` and ``include_lm_head`` are true."""
    include: list[Pattern] = Field(default_factory=list)
    """When non-empty, only sites matching one of these patterns are in scope."""
    exclude: list[Pattern] = Field(default_factory=list)
    """Sites matching any of these patterns are out of scope (stay dense, not in the budget)."""


class _Matching(_Model):
    """A model whose ``match`` field holds one site-name pattern or a list of them."""

    match: str | list[str]

    @field_validator("match", mode="before")
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        return check_patterns(value)

    @property
    def patterns(self) -> tuple[str, ...]:
        """The patterns as a tuple, whether written as one string or a list."""
        return (self.match,) if isinstance(self.match, str) else tuple(self.match)


class Rule(_Matching):
    """Which formats the sites matching a pattern may use."""

    match: str | list[str]
    """Pattern or list of patterns (any may match): an exact name, a glob (``*``, ``?``,
    ``[...]``; ``*`` crosses dots) or ``re:`` + a regex matching the whole name. Tried against the
    parameter name (``x.weight``), the module name (``x``) and tied aliases."""
    formats: list[FormatChoice] = Field(min_length=1)
    """Formats the matching sites may use, each with its search limits; the planner picks the best
    candidate among all of them. ``[{kind: dense}]`` leaves the sites uncompressed."""
    name: str | None = None
    """A label for the rule, shown by ``explain`` and recorded in the plan (default ``rules[i]``)."""
    bits: list[BitWidth] | None = Field(default=None, min_length=1)
    """Bit widths the stored values of the matching sites may take (``[4, 8]``: the deployment's
    kernels take int4 and int8 only); 16 is bf16/fp16, 32 fp32. None: no limit. Every format's
    precisions are narrowed to these; a ``dense`` format that lists no precisions (or only ``keep``)
    searches the default ones (`kronc.policies.choices.DEFAULT_PRECISIONS`) within the limits. ``keep`` (the
    weight's own dtype, no kernel needed) is always allowed."""
    group_sizes: list[GroupLimit] | None = Field(default=None, min_length=1)
    """Scale groups the integer precisions of the matching sites may use: 16, 32, 64, 128 values
    along the input, or ``row`` (one scale per row, as int8 takes). None: no limit. Applied like
    ``bits``."""
    rotation: bool | None = None
    """Rotated integer precisions (``rotate: true``: the dense weight stored as ``W R``, the input
    rotated at run time by a fixed Hadamard transform): false forbids them (kernels that cannot rotate
    their input), true allows only them among the integer precisions. None: no limit. Applied like
    ``bits``."""

    def limits(self) -> str:
        """``""`` or e.g. ``bits 4,8; groups 32,row``: the rule's limits in a short form (for ``explain``)."""
        parts = []
        if self.bits is not None:
            parts.append("bits " + ",".join(map(str, self.bits)))
        if self.group_sizes is not None:
            parts.append("groups " + ",".join(map(str, self.group_sizes)))
        if self.rotation is not None:
            parts.append("rotated only" if self.rotation else "no rotation")
        return "; ".join(parts)

    def allows(self, p: Precision) -> bool:
        """Whether precision ``p`` is within the rule's ``bits``, ``group_sizes`` and ``rotation``."""
        if self.bits is not None and p.bits not in self.bits:
            return False
        if self.rotation is not None and not p.is_float and p.rotate != self.rotation:
            return False
        if self.group_sizes is not None and not p.is_float:
            return (p.group_size or "row") in self.group_sizes
        return True

    @property
    def limited(self) -> bool:
        """Whether the rule sets any precision limit."""
        return self.bits is not None or self.group_sizes is not None or self.rotation is not None

    def allowed_formats(self) -> list[Choice]:
        """`formats` narrowed to the rule's limits (formats left with no precision dropped)."""
        if not self.limited:
            return list(self.formats)
        out = []
        for choice in self.formats:
            narrowed = _narrow(choice, self.allows)
            if narrowed is not None:
                out.append(narrowed)
        return out

    @model_validator(mode="after")
    def _limits_leave_something(self) -> Rule:
        quantized = [p for c in self.allowed_formats() for p in [*c.precisions, *getattr(c, "bases", [])] if not isinstance(p, str)]
        if self.limited and not quantized:
            kinds = ", ".join(c.kind for c in self.formats)
            raise ValueError(
                (f"rule {self.name!r}: " if self.name else "")
                + f"bits {self.bits} and group_sizes {self.group_sizes}"
                + ("" if self.rotation is None else f" (rotation {str(self.rotation).lower()})")
                + f" leave none of the formats ({kinds}) a precision besides 'keep'; "
                f"allowed bits: {list(BIT_WIDTHS)}, group_sizes: {list(GROUP_LIMITS)}, rotation: true, false or null"
            )
        return self


def _narrow(choice: Choice, allows: Callable[[Precision], bool]) -> Choice | None:
    """``choice`` with only the precisions ``allows`` (a dense choice that lists none or only ``keep``: the default ones,
    ``keep`` included); a base-plus-correction choice also narrows its bases. None: nothing left."""
    listed: list[Any] = list(choice.precisions)
    if choice.kind == "dense" and list(choice.precisions) == ["keep"]:  # also after a dump and reload
        listed = ["keep", *DEFAULT_PRECISIONS]
    kept = [p for p in listed if isinstance(p, str) or allows(p)]
    update: dict[str, Any] = {"precisions": kept}
    bases = getattr(choice, "bases", None)
    if bases is not None:
        update["bases"] = [b for b in bases if allows(b)]
        if not update["bases"]:
            return None
    if not kept:
        return None
    return choice.model_copy(update=update)


class Fixed(_Matching):
    """Sites stored dense at one given precision, *outside* the budget (see `Policy.fixed`)."""

    match: str | list[str]
    """Pattern or list of patterns (any may match), as a rule's ``match``: an exact name, a glob or
    ``re:`` + a regex; tried against the parameter name, the module name and tied aliases (``lm_head``
    matches SmolLM2's ``model.embed_tokens.weight``, which the head shares)."""
    precision: Precision
    """How the matching sites' weights are stored, e.g. ``{dtype: int8}`` (one scale per row) or
    ``{dtype: int4, group_size: 64}``; the group size must divide the weight's input dimension (an
    embedding's width). A tied embedding/LM head is stored once: its lookups dequantize only the rows they
    gather, its product runs the packed int8/int4 kernels at decode sizes."""
    name: str | None = None
    """A label shown by ``explain`` and recorded in the plan (default ``fixed[i]``)."""


class SolverOptions(_Model):
    """How the planner picks one candidate per site under the budget."""

    sensitivity: Literal["fisher", "none"] = "fisher"
    """Data objective only: ``fisher`` weights each site's output error by how much the model's loss
    moves per unit of it (a Fisher information per output feature, from a backward pass on the first
    ``sensitivity_batches`` calibration batches; see `kronc.planning.collect_sensitivity`);
    ``none`` sums the plain output errors."""
    sensitivity_batches: int = Field(default=2, ge=1)
    """Calibration batches used for the sensitivity (each costs about three forward passes)."""


class Policy(_Model):
    """A compression policy: budget, scope, rules, objective and solver options."""

    budget: Budget = Field(examples=["25x", "40MB", "512KiB", "3M params"])
    """How small the in-scope weights must become: a ratio (``"25x"``), a size in bytes
    (``"40MB"``, ``"512KiB"``) or a count of stored values (``"3M params"``)."""
    name: str = ""
    """Short name of the policy (shipped policies use their file name)."""
    description: str = ""
    """What the policy is for, in a sentence or two."""
    scope: Scope = Field(default_factory=Scope)
    """Which sites are compressed and counted in the budget."""
    rules: list[Rule] = Field(default_factory=list)
    """Per-site format choices; the first rule (in this order) that matches a site applies."""
    fixed: list[Fixed] = Field(default_factory=list)
    """Sites stored dense at a fixed precision and left out of the budget, e.g. the tied embedding/LM
    head of a language model (``[{match: lm_head, precision: {dtype: int8}}]``). The first entry that
    matches a site applies, whatever ``scope`` and ``rules`` say about it; its bytes are not in the
    budget's total (a ratio budget stays a ratio over the in-scope sites), and the plan reports them
    separately (`kronc.Plan.total_ratio`). Empty by default: such sites stay as they are."""
    default_formats: list[FormatChoice] = Field(default_factory=lambda: list(ALL_FORMATS), min_length=1)
    """Formats for in-scope sites no rule matches (default: every format with its default limits,
    dense and unstructured pruning included; with ``objective: data``, only dense and unstructured
    pruning, see ``kronc.policies.choices.DATA_FORMATS``). ``[{kind: dense}]`` compresses only
    what rules name."""
    objective: Literal["weight", "data"] = "weight"
    """What the planner minimises: ``weight`` error ``||W - W'||`` or ``data``-aware error
    ``||X (W - W')ᵀ||`` measured on calibration inputs (these must be given when compiling)."""
    solver: SolverOptions = Field(default_factory=SolverOptions)
    """Options of the budget solver."""
    recovery: RecoveryConfig | None = None
    """A recipe for `kronc.recover` (knowledge distillation from the dense model after compressing):
    steps, time budget, learning rate, loss weights. Used by ``kronc compress --recover-text``; None:
    the defaults of `RecoveryConfig`."""

    @field_validator("rules", mode="before")
    @classmethod
    def _rule_count(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)) and len(value) > MAX_RULES:
            raise ValueError(f"{len(value):,} rules; a policy may have at most {MAX_RULES:,} (matching is sites x rules)")
        return value

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        # a bare number in a file is ambiguous (ratio? bytes?): ask for the spelling. Other mistakes are a
        # BudgetError from Budget.parse, a ValueError that pydantic reports at `budget`.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(f"write the budget as a string, e.g. '{value:g}x' for a ratio, '40MB' or '3M params'")
        return value

    @model_validator(mode="before")
    @classmethod
    def _data_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("objective") == "data" and "default_formats" not in data:
            data = {**data, "default_formats": list(DATA_FORMATS)}
        return data

    def data_aware(self) -> Policy:
        """This policy with the ``data`` objective; its default formats become `DATA_FORMATS` unless
        they were set explicitly."""
        if self.objective == "data":
            return self
        update: dict[str, Any] = {"objective": "data"}
        if "default_formats" not in self.model_fields_set:
            update["default_formats"] = list(DATA_FORMATS)
        return self.model_copy(update=update)

    @model_validator(mode="after")
    def _unique_rule_names(self) -> Policy:
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            if rule.name is None:
                continue
            if rule.name in seen:
                raise ValueError(f"rules[{i}].name: duplicate rule name {rule.name!r} (also rules[{seen[rule.name]}])")
            seen[rule.name] = i
        return self

    def fixed_label(self, index: int) -> str:
        """How ``fixed`` entry ``index`` is named in explanations and plans: its ``name`` or ``fixed[i]``."""
        return self.fixed[index].name or f"fixed[{index}]"

    def rule_label(self, index: int) -> str:
        """How rule ``index`` is named in explanations and plans: its ``name`` or ``rules[i]``."""
        return self.rules[index].name or f"rules[{index}]"
