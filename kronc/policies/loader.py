"""Reading and writing policy files (YAML, TOML, JSON) and finding shipped policies by name.

``load_policy("edge-25x")`` looks for ``edge-25x.{yaml,yml,toml,json}`` in each directory of the
``KRONC_POLICY_PATH`` environment variable (``os.pathsep``-separated), then among the shipped
policies (package data in ``kronc/policies/shipped``, which the repository's top-level ``policies/``
links to, so they are found from a wheel install too). Anything wrong with a file raises one
`PolicyError` listing every problem as ``<file>: <key path>: <message>`` (syntax errors as
``<file>:<line>:<column>: ...``).

``dump_policy`` writes the keys that were set (in a file, or by the Python caller), so that
file -> `Policy` -> file keeps exactly what was written; ``full=True`` writes every key.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from ..budget import Budget
from . import _toml
from .diagnostics import validation_problems
from .errors import PolicyError, Problem
from .model import Policy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FileFormat = Literal["yaml", "toml", "json"]
SUFFIXES: dict[str, FileFormat] = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}
ENV_VAR = "KRONC_POLICY_PATH"
MAX_POLICY_BYTES = 1 << 20
"""Largest policy file read (policies are a few kB; a huge one would take minutes and gigabytes)."""
MAX_POLICY_VALUES = 100_000
"""Most values (keys, list items, scalars) in a parsed policy, YAML aliases expanded."""
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
"""The shipped policies: package data (``kronc/policies/shipped``), linked as the repository's ``policies/``."""


def policy_dirs() -> list[Path]:
    """Directories searched for policies by name: ``$KRONC_POLICY_PATH`` entries, then `SHIPPED_DIR`."""
    extra = [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return [*extra, SHIPPED_DIR]


def list_policies() -> dict[str, Path]:
    """Every policy findable by name, mapped to its file (earlier directories win)."""
    found: dict[str, Path] = {}
    for d in policy_dirs():
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in SUFFIXES and not f.name.endswith(".schema.json") and f.is_file():
                found.setdefault(f.stem, f)
    return found


def find_policy(name: str) -> Path:
    """The file of the policy called ``name`` (with or without its suffix); `PolicyError` if none."""
    for d in policy_dirs():
        candidates = [d / name] if Path(name).suffix.lower() in SUFFIXES else [d / (name + s) for s in SUFFIXES]
        for c in candidates:
            if c.is_file():
                return c
    available = ", ".join(list_policies()) or "none"
    searched = ", ".join(str(d) for d in policy_dirs())
    raise PolicyError([Problem(name, "", f"no such policy file or policy name (available: {available}; searched: {searched})")])


def _locate(source: str | Path) -> Path:
    """A file for ``source``: the path itself when it names a file, else a policy found by name."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if isinstance(source, Path) or "/" in source or os.sep in source:
        raise PolicyError([Problem(str(source), "", "file not found")])
    return find_policy(source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects a key written twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_text(text: str, fmt: FileFormat, source: str = "<text>") -> Any:
    """Parse policy text; syntax errors become a `PolicyError` with line and column."""
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError([Problem(source, "", f"the policy is {len(text):,} characters long; policies are limited to "
                                   f"{MAX_POLICY_BYTES:,} (a few kB is typical)")])
    if fmt == "yaml":
        return _parse_yaml(text, source)
    if fmt == "toml":
        return _parse_toml(text, source)
    try:
        return json.loads(text, object_pairs_hook=_json_pairs)
    except json.JSONDecodeError as e:
        raise PolicyError([Problem(source, "", f"JSON syntax error: {e.msg}", e.lineno, e.colno)]) from None
    except ValueError as e:  # a duplicate key
        raise PolicyError([Problem(source, "", f"JSON error: {e}")]) from None


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        msg = f"YAML syntax error: {e.problem or e.context}"
        if "alias" in f"{e.context} {e.problem}":
            msg += " (quote patterns that start with '*', e.g. '*.mlp.*')"
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise PolicyError([Problem(source, "", msg, line, col)]) from None
    except (yaml.YAMLError, ValueError) as e:
        raise PolicyError([Problem(source, "", f"YAML error: {e}")]) from None


def _parse_toml(text: str, source: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        if m := re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(e), re.S):
            raise PolicyError([Problem(source, "", f"TOML syntax error: {m[1]}", int(m[2]), int(m[3]))]) from None
        if m := re.fullmatch(r"(.*) \(at end of document\)", str(e), re.S):
            lines = text.split("\n")
            where = (len(lines), len(lines[-1]) + 1)
            raise PolicyError([Problem(source, "", f"TOML syntax error: {m[1]} (at end of file)", *where)]) from None
        raise PolicyError([Problem(source, "", f"TOML syntax error: {e}")]) from None


def read_policy_file(path: str | Path) -> Any:
    """The raw data in a policy file (before validation)."""
    path, source = Path(path), str(path)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise PolicyError([Problem(source, "", f"unsupported file type {path.suffix!r} (use .yaml, .yml, .toml or .json)")])
    try:
        size = path.stat().st_size
        if size > MAX_POLICY_BYTES:
            raise PolicyError([Problem(source, "", f"the file is {size:,} bytes; policy files are limited to "
                                       f"{MAX_POLICY_BYTES:,} bytes (a few kB is typical)")])
        with path.open(encoding="utf-8") as f:  # a FIFO or a file growing meanwhile: read no more than the cap
            text = f.read(MAX_POLICY_BYTES + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError([Problem(source, "", f"cannot read file: {e}")]) from None
    return parse_text(text, fmt, source)


def _count_values(data: Any, limit: int) -> int:
    """How many values ``data`` holds, counting stops just past ``limit`` (aliases can nest exponentially)."""
    count, stack = 0, [data]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


def validate_policy(data: Any, source: str = "<dict>") -> Policy:
    """A `Policy` from parsed data; every problem reported at once in one `PolicyError`."""
    if data is None:
        raise PolicyError([Problem(source, "", "the policy is empty (it needs at least a 'budget')")])
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise PolicyError([Problem(source, "", f"expected a mapping of policy keys at the top level, got {kind}")])
    if _count_values(data, MAX_POLICY_VALUES) > MAX_POLICY_VALUES:
        raise PolicyError([Problem(source, "", f"the policy holds more than {MAX_POLICY_VALUES:,} values "
                                   "(YAML aliases included): it is far larger than a policy needs")])
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        raise PolicyError(validation_problems(e, source, Policy)) from None


def load_policy(source: str | Path | dict[str, Any] | Policy) -> Policy:
    """A `Policy` from a file path (.yaml/.yml/.toml/.json), a policy name (see `find_policy`), a dict
    of policy data, or a `Policy` (returned as is). Raises `PolicyError` naming file and key path."""
    if isinstance(source, Policy):
        return source
    if isinstance(source, dict):
        return validate_policy(source)
    if not isinstance(source, (str, Path)):
        raise PolicyError([Problem("<policy>", "", f"a policy is a Policy, a dict, a file path or a policy name, "
                                   f"got a {type(source).__name__}")])
    try:
        path = _locate(source)
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte...
        if isinstance(e, PolicyError):
            raise
        shown = str(source) if len(str(source)) <= 80 else str(source)[:80] + "..."
        raise PolicyError([Problem(shown, "", f"cannot be used as a policy file or name: {e.__class__.__name__}: "
                                   f"{str(e).split(':')[0]}")]) from None
    return validate_policy(read_policy_file(path), str(path))


def _data(obj: Any, full: bool) -> Any:
    if isinstance(obj, BaseModel):
        fields = type(obj).model_fields
        keys = [k for k in fields if full or k in obj.model_fields_set or k == "kind"]
        return {k: _data(getattr(obj, k), full) for k in keys}
    if isinstance(obj, (list, tuple)):
        return [_data(x, full) for x in obj]
    if isinstance(obj, Budget):
        return str(obj)  # as the user wrote it
    return obj


def policy_data(policy: Policy, *, full: bool = False) -> dict[str, Any]:
    """Plain data for ``policy``: the keys that were set (every key with ``full``), format ``kind``s always."""
    return _data(policy, full)


def dumps_policy(policy: Policy, fmt: FileFormat = "yaml", *, full: bool = False) -> str:
    """Policy text in ``fmt`` (``yaml``, ``toml`` or ``json``)."""
    data = policy_data(policy, full=full)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None, width=110)
    if fmt == "toml":
        return _toml.dumps(data)
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    raise ValueError(f"unknown policy file format {fmt!r} (use yaml, toml or json)")


def dump_policy(policy: Policy, path: str | Path, *, full: bool = False) -> Path:
    """Write ``policy`` to ``path``, in the format its suffix names; returns the path."""
    path = Path(path)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the format of {path}: use a .yaml, .yml, .toml or .json suffix")
    path.write_text(dumps_policy(policy, fmt, full=full), encoding="utf-8")
    return path
