"""Readable problems from pydantic validation errors: one `Problem` per mistake, with a key path.

pydantic locates an error by a tuple such as ``("rules", 2, "formats", 0, "doped", "density_max")``;
this module turns it into ``rules[2].formats[0].density_max`` (the discriminated union's tag
element dropped) and rewrites the message in the policy writer's terms: unknown keys list the
allowed ones, unknown kinds list the allowed kinds, ranges are written as intervals. Errors from the
alternatives of a plain union (``a_shapes: auto`` or a list of pairs) are merged into one.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from .choices import ChoiceByKind, tagged_union
from .errors import Problem

_NOUNS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "a whole number",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
    "tuple_type": "a list", "set_type": "a list", "dict_type": "a mapping (key: value)",
    "model_type": "a mapping (key: value)", "model_attributes_type": "a mapping (key: value)",
}
_TYPE_NAMES = {
    dict: "a mapping", list: "a list", tuple: "a list", str: "a string", int: "an integer",
    float: "a number", bool: "a boolean", type(None): "null",
}


@dataclass
class _Where:
    """What a pydantic ``loc`` points at, found by walking the model's types along it."""

    path: str = ""
    model: type[BaseModel] | None = None
    """The model whose key the last element of ``loc`` names."""
    field: FieldInfo | None = None
    """That key's field, when it is one."""
    annotation: Any = None
    """The type at the end of ``loc`` (``None`` when unknown)."""
    union_path: str | None = None
    """Key path of the first plain (untagged) union crossed, if any."""
    depth: int = 0
    """How many ``loc`` elements came after that union's alternative label."""


def _unwrap(tp: Any) -> tuple[Any, str | None]:
    """Strip ``Annotated``; return the bare type and its discriminator, if any."""
    disc = None
    while get_origin(tp) is typing.Annotated:
        if ChoiceByKind in tp.__metadata__:  # a registry-dispatched choice reads as the tagged union
            tp = tagged_union()
        for meta in tp.__metadata__:
            if isinstance(meta, FieldInfo) and isinstance(meta.discriminator, str):
                disc = meta.discriminator
        tp = get_args(tp)[0]
    return tp, disc


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _members(tp: Any) -> list[Any]:
    return [_unwrap(a)[0] for a in get_args(tp) if a is not type(None)]


def _tag_of(member: Any, disc: str) -> str | None:
    if isinstance(member, type) and issubclass(member, BaseModel) and disc in member.model_fields:
        args = get_args(member.model_fields[disc].annotation)
        return str(args[0]) if args else None
    return None


def _label_matches(member: Any, label: str) -> bool:
    head = label.split("[", 1)[0].lower()
    origin = get_origin(member)
    if origin is Literal:
        return head == "literal"
    if origin is not None:
        return head == getattr(origin, "__name__", "").lower()
    return head == getattr(member, "__name__", "").lower()


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else part


def locate(loc: tuple[str | int, ...], root: type[BaseModel]) -> _Where:
    """Walk ``loc`` through ``root``'s field types, building the user-facing key path."""
    w = _Where(annotation=root)
    tp: Any = root
    i = 0
    while i < len(loc):
        part = loc[i]
        tp, disc = _unwrap(tp)
        if _is_union(tp):
            members = _members(tp)
            if disc is not None and isinstance(part, str):  # tag element of a discriminated union
                tp = next((m for m in members if _tag_of(m, disc) == part), None)
                i += 1
                continue
            if len(members) == 1:  # Optional[X]: pydantic adds no element for it
                tp = members[0]
                continue
            if isinstance(part, str):  # label of one alternative of a plain union
                if w.union_path is None:
                    w.union_path, w.depth = w.path, 0
                tp = next((m for m in members if _label_matches(m, part)), None)
                i += 1
                continue
        w.path = _join(w.path, part)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            w.model = tp
            w.field = tp.model_fields.get(part) if isinstance(part, str) else None
            tp = w.field.annotation if w.field is not None else None
            if w.field is not None and isinstance(w.field.discriminator, str):
                tp = typing.Annotated[tp, FieldInfo(discriminator=w.field.discriminator)]
        elif get_origin(tp) in (list, set, frozenset) and isinstance(part, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is tuple and isinstance(part, int):
            args = get_args(tp)
            tp = args[0] if len(args) == 2 and args[1] is Ellipsis else (args[part] if part < len(args) else None)
        else:
            tp = None
        if w.union_path is not None:
            w.depth += 1
        i += 1
    w.annotation = tp
    return w


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = _TYPE_NAMES.get(type(value))
    return f"{text} ({kind})" if kind and not isinstance(value, str) else text


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _interval(field: FieldInfo | None) -> str | None:
    lo = hi = None
    for m in field.metadata if field is not None else ():
        if isinstance(m, at.Gt):
            lo = f"({_num(m.gt)}"
        elif isinstance(m, at.Ge):
            lo = f"[{_num(m.ge)}"
        elif isinstance(m, at.Lt):
            hi = f"{_num(m.lt)})"
        elif isinstance(m, at.Le):
            hi = f"{_num(m.le)}]"
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return f"{'>' if lo[0] == '(' else '>='} {lo[1:]}"
    if hi:
        return f"{'<' if hi[-1] == ')' else '<='} {hi[:-1]}"
    return None


def _choices(words: list[str], got: object) -> str:
    text = ", ".join(words)
    close = difflib.get_close_matches(str(got), words, n=1) if isinstance(got, str) else []
    return f"(did you mean {close[0]!r}? allowed: {text})" if close else f"(allowed: {text})"


def _tags(tp: Any) -> list[str]:
    bare, disc = _unwrap(tp)
    if disc is None or not _is_union(bare):
        return []
    return [t for m in _members(bare) if (t := _tag_of(m, disc)) is not None]


def _literal_values(tp: Any) -> list[str]:
    bare, _ = _unwrap(tp)
    return [str(a) for a in get_args(bare)] if get_origin(bare) is Literal else []


def _message(err: ErrorDetails, w: _Where) -> tuple[str, str]:
    """(path, message) for one pydantic error."""
    t, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    path = w.path
    if t == "extra_forbidden":
        key = str(err["loc"][-1])
        allowed = list(w.model.model_fields) if w.model is not None else []
        return path, f"unknown key {key!r} {_choices(allowed, key)}"
    if t == "missing":
        return path, "required key is missing"
    if t in ("union_tag_invalid", "union_tag_not_found"):
        disc = str(ctx.get("discriminator", "kind")).strip("'\"")
        tags = _tags(w.annotation) or [s.strip(" '") for s in str(ctx.get("expected_tags", "")).split(",")]
        path = _join(path, disc)
        if t == "union_tag_not_found":
            return path, f"required key is missing (allowed: {', '.join(tags)})"
        return path, f"unknown {disc} {ctx.get('tag')!r} {_choices(tags, ctx.get('tag'))}"
    if t == "literal_error":
        values = _literal_values(w.annotation) or [s.strip(" '") for s in str(ctx.get("expected", "")).split(",")]
        return path, f"{got!r} is not allowed {_choices(values, got)}"
    if t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bound = _interval(w.field) or err["msg"].removeprefix("Input should be ")
        return path, f"must be {bound}, got {_num(got)}"
    if t in ("value_error", "assertion_error"):
        return path, str(ctx.get("error", err["msg"]))
    if t in _NOUNS:
        return path, f"expected {_NOUNS[t]}, got {_show(got)}"
    if t in ("too_short", "too_long"):
        n = ctx.get("min_length" if t == "too_short" else "max_length")
        return path, f"needs {'at least' if t == 'too_short' else 'at most'} {n} item{'s' if n != 1 else ''}"
    msg = str(err["msg"])
    return path, msg[:1].lower() + msg[1:]


def _expected(err: ErrorDetails) -> str:
    if err["type"] == "literal_error":
        return str((err.get("ctx") or {}).get("expected", "a listed value"))
    return _NOUNS.get(err["type"], err["msg"])


def validation_problems(error: ValidationError, source: str, root: type[BaseModel]) -> list[Problem]:
    """One `Problem` per mistake in ``error``, located in ``source`` (a file name or ``<dict>``)."""
    errors = [(e, locate(tuple(e["loc"]), root)) for e in error.errors()]
    deepest: dict[str, int] = {}
    for _, w in errors:
        if w.union_path is not None:
            deepest[w.union_path] = max(deepest.get(w.union_path, 0), w.depth)
    problems: list[Problem] = []
    merged: set[str] = set()
    for err, w in errors:
        if w.union_path is None:
            problems.append(Problem(source, *_message(err, w)))
            continue
        if w.depth < deepest[w.union_path]:
            continue  # another alternative got further: its errors are the real ones
        if w.depth > 0:
            problems.append(Problem(source, *_message(err, w)))
            continue
        if w.union_path in merged:
            continue
        merged.add(w.union_path)
        alternatives = [_expected(e) for e, v in errors if v.union_path == w.union_path and v.depth == 0]
        alternatives = list(dict.fromkeys(alternatives))
        problems.append(Problem(source, w.union_path, f"expected {' or '.join(alternatives)}, got {_show(err.get('input'))}"))
    return problems
