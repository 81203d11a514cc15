"""Site name patterns: exact names, globs and ``re:`` regular expressions.

* ``re:<regex>``: the regex must match a whole name (`re.fullmatch`);
* a pattern containing ``*``, ``?`` or ``[`` is a glob (`fnmatch.fnmatchcase`, case-sensitive;
  ``*`` also crosses dots, so ``*.mlp.*`` matches ``model.layers.0.mlp.up_proj``);
* anything else must equal a name exactly.

A pattern is tried against every name a site answers to: its parameter name
(``model.layers.0.self_attn.q_proj.weight``), its module name (``model.layers.0.self_attn.q_proj``)
and, for tied weights, each alias in both forms (``lm_head.weight``, ``lm_head``).
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Literal

from ..sites import Site

REGEX_PREFIX = "re:"
_GLOB_CHARS = frozenset("*?[")

PatternKind = Literal["exact", "glob", "regex"]


def pattern_kind(pattern: str) -> PatternKind:
    """Which syntax ``pattern`` is written in."""
    if pattern.startswith(REGEX_PREFIX):
        return "regex"
    return "glob" if _GLOB_CHARS & set(pattern) else "exact"


@lru_cache(maxsize=1024)
def _regex(body: str) -> re.Pattern[str]:
    return re.compile(body)


def check_pattern(pattern: str) -> str:
    """Return ``pattern`` unchanged, or raise `ValueError` saying why it can never work."""
    if not pattern.strip():
        raise ValueError("a pattern cannot be empty")
    if pattern_kind(pattern) == "regex":
        body = pattern[len(REGEX_PREFIX):]
        if not body:
            raise ValueError(f"pattern {pattern!r} has nothing after 're:'")
        try:
            _regex(body)
        except re.error as e:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
    return pattern


def _strip_weight(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def site_names(site: Site) -> tuple[str, ...]:
    """Every name a pattern is tried against, parameter name first."""
    names = [site.name, site.module_name]
    for alias in site.aliases:
        names += [alias, _strip_weight(alias)]
    return tuple(dict.fromkeys(names))


def name_matches(pattern: str, name: str) -> bool:
    """Whether ``pattern`` matches one name."""
    kind = pattern_kind(pattern)
    if kind == "regex":
        return _regex(pattern[len(REGEX_PREFIX):]).fullmatch(name) is not None
    if kind == "glob":
        return fnmatchcase(name, pattern)
    return name == pattern


def pattern_matches(pattern: str, site: Site) -> bool:
    """Whether ``pattern`` matches any of the site's names (see the module docstring)."""
    return any(name_matches(pattern, n) for n in site_names(site))
