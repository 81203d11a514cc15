"""Site name patterns: exact names, globs and ``re:`` regular expressions.

* ``re:<regex>``: the regex must match a whole name (`re.fullmatch`);
* a pattern containing ``*``, ``?`` or ``[`` is a glob (`fnmatch.fnmatchcase`, case-sensitive;
  ``*`` also crosses dots, so ``*.mlp.*`` matches ``model.layers.0.mlp.up_proj``);
* anything else must equal a name exactly.

A pattern is tried against every name a site answers to: its parameter name
(``model.layers.0.self_attn.q_proj.weight``), its module name (``model.layers.0.self_attn.q_proj``)
and, for tied weights, each alias in both forms (``lm_head.weight``, ``lm_head``).

Python's regex engine backtracks, so a pattern such as ``re:(.*.*)*X`` can take exponential time.
Regexes are therefore bounded up front (`check_pattern`): no repetition inside another repetition,
no alternation or optional part inside an unbounded repetition, at most `MAX_UNBOUNDED_REPEATS`
unbounded repetitions and `MAX_PATTERN_CHARS` characters. As a backstop, a match that still takes
longer than `SLOW_MATCH_SECONDS` stops planning with a `PolicyError` naming the pattern.
"""

from __future__ import annotations

import re
import sys
import time
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any, Literal

from ..sites import Site
from .errors import PolicyError, Problem

if sys.version_info >= (3, 11):
    from re import _constants as _sre_constants
    from re import _parser as _sre_parse
else:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_constants
    import sre_parse as _sre_parse

REGEX_PREFIX = "re:"
_GLOB_CHARS = frozenset("*?[")
MAX_PATTERN_CHARS = 1000
"""Longest pattern accepted (site names are far shorter)."""
MAX_UNBOUNDED_REPEATS = 4
"""Most ``*``/``+``/``{n,}`` repetitions in one regex: keeps the worst-case backtracking polynomial and small."""
SLOW_MATCH_SECONDS = 0.5
"""A regex taking longer than this on one name stops planning with a `PolicyError` naming it."""
_REPEATS = {_sre_constants.MAX_REPEAT, _sre_constants.MIN_REPEAT}
if hasattr(_sre_constants, "POSSESSIVE_REPEAT"):
    _REPEATS.add(_sre_constants.POSSESSIVE_REPEAT)
_UNBOUNDED = 100  # a repetition allowing more than this many is treated as unbounded

PatternKind = Literal["exact", "glob", "regex"]


def pattern_kind(pattern: str) -> PatternKind:
    """Which syntax ``pattern`` is written in."""
    if pattern.startswith(REGEX_PREFIX):
        return "regex"
    return "glob" if _GLOB_CHARS & set(pattern) else "exact"


@lru_cache(maxsize=1024)
def _regex(body: str) -> re.Pattern[str]:
    compiled = re.compile(body)
    problem = _backtracking_risk(body)
    if problem:
        raise ValueError(problem)
    return compiled


def _subpatterns(av: Any) -> list[Any]:
    """The sub-patterns inside one parsed regex item's argument (groups, branches, repeat bodies)."""
    if isinstance(av, _sre_parse.SubPattern):
        return [av]
    if isinstance(av, (tuple, list)):
        return [sub for x in av for sub in _subpatterns(x)]
    return []


def _backtracking_risk(body: str) -> str | None:
    """Why matching ``body`` could take exponential (or very high polynomial) time, or None."""
    if len(body) > MAX_PATTERN_CHARS:
        return f"is {len(body)} characters long (at most {MAX_PATTERN_CHARS})"
    unbounded = 0

    def walk(items: Any, in_repeat: bool, in_unbounded: bool) -> str | None:
        nonlocal unbounded
        for op, av in items:
            if op in _REPEATS:
                _, hi, sub = av
                many = hi == _sre_constants.MAXREPEAT or hi > _UNBOUNDED
                if (in_repeat and hi > 1) or in_unbounded:
                    return "nests a repetition inside another repetition"
                unbounded += many
                if why := walk(sub, in_repeat or hi > 1, in_unbounded or many):
                    return why
                continue
            if op == _sre_constants.BRANCH and in_unbounded:
                return "repeats an alternation (a|b)* without bound"
            for sub in _subpatterns(av):
                if why := walk(sub, in_repeat, in_unbounded):
                    return why
        return None

    why = walk(_sre_parse.parse(body), False, False)
    if why is None and unbounded > MAX_UNBOUNDED_REPEATS:
        why = f"has {unbounded} unbounded repetitions (at most {MAX_UNBOUNDED_REPEATS})"
    if why is None:
        return None
    return (f"pattern {REGEX_PREFIX + body!r} {why}, which can make matching take exponential time; write it "
            "without nested or many repetitions (a glob such as '*.mlp.*' is often enough)")


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
        except (RecursionError, OverflowError) as e:
            raise ValueError(f"pattern {pattern!r} is too complex: {type(e).__name__}") from None
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
        regex = _regex(pattern[len(REGEX_PREFIX):])
        start = time.perf_counter()
        found = regex.fullmatch(name) is not None
        if time.perf_counter() - start > SLOW_MATCH_SECONDS:
            raise PolicyError([Problem("<policy>", "", f"pattern {pattern!r} took over {SLOW_MATCH_SECONDS:g} s to "
                                       f"match the site name {name!r}: simplify it")])
        return found
    if kind == "glob":
        return fnmatchcase(name, pattern)
    return name == pattern


def pattern_matches(pattern: str, site: Site) -> bool:
    """Whether ``pattern`` matches any of the site's names (see the module docstring)."""
    return any(name_matches(pattern, n) for n in site_names(site))
