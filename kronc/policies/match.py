"""Resolving a policy against a model's sites: scope, then the first matching rule.

`resolve` is the one place the precedence written in `kronc.policies.model` is implemented: a site
a ``fixed`` entry matches gets that entry's precision (outside the budget); a site out of scope gets no formats; an in-scope site gets the formats of the first rule (in file order)
with a pattern matching any of its names, or ``default_formats`` when none does. Rules that end up
applying to no site, and scope pattern lists that match nothing, are reported as `PolicyWarning`s.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from ..sites import Site
from ..values import Precision
from .choices import FormatChoice
from .errors import PolicyWarning
from .model import Policy, Scope
from .patterns import pattern_matches

__all__ = ["Resolution", "SiteResolution", "in_scope", "pattern_matches", "resolve"]


@dataclass(frozen=True)
class SiteResolution:
    """What a policy says about one site."""

    site: Site
    in_scope: bool
    reason: str
    """Why the site is in or out of scope, in words."""
    rule_index: int | None = None
    """Index of the rule that applied, or ``None`` (out of scope, or ``default_formats``)."""
    rule: str | None = None
    """Label of what applied: the rule's name or ``rules[i]``, ``default_formats``, or ``None``."""
    formats: tuple[FormatChoice, ...] = ()
    """Formats the site may use (empty when out of scope)."""
    fixed: Precision | None = None
    """The precision a ``fixed`` entry stores the site at (outside the budget; ``in_scope`` is then false
    and ``rule`` is the entry's label), or None."""

    @property
    def dense(self) -> bool:
        """True when the site cannot be compressed: out of scope, or only ``dense`` allowed."""
        return all(f.identity for f in self.formats)


@dataclass(frozen=True)
class Resolution:
    """A policy applied to a list of sites."""

    policy: Policy
    sites: tuple[SiteResolution, ...]
    unmatched_rules: tuple[int, ...]
    """Indices of rules that apply to no site (each is also in ``warnings``)."""
    warnings: tuple[str, ...]
    """Everything that is probably a mistake, one message each."""

    def __getitem__(self, name: str) -> SiteResolution:
        for r in self.sites:
            if r.site.name == name or name in r.site.aliases:
                return r
        raise KeyError(f"no site {name!r}; sites: {', '.join(r.site.name for r in self.sites)}")

    @property
    def in_scope(self) -> tuple[SiteResolution, ...]:
        return tuple(r for r in self.sites if r.in_scope)


def _is_embedding(site: Site) -> bool:
    return site.kind == "embedding" or "embedding" in site.tags


def in_scope(scope: Scope, site: Site) -> tuple[bool, str]:
    """Whether ``site`` is in ``scope``, and why (see `kronc.policies.model` for the order)."""
    embedding, head = _is_embedding(site), "lm_head" in site.tags
    if not embedding and site.kind not in scope.kinds:
        return False, f"kind {site.kind!r} not in scope.kinds"
    if embedding and head and not (scope.include_embeddings and scope.include_lm_head):
        return False, "tied embedding/LM head (needs include_embeddings and include_lm_head)"
    if embedding and not scope.include_embeddings:
        return False, "embedding (scope.include_embeddings is false)"
    if head and not scope.include_lm_head:
        return False, "LM head (scope.include_lm_head is false)"
    if scope.include and not any(pattern_matches(p, site) for p in scope.include):
        return False, "matches no scope.include pattern"
    for p in scope.exclude:
        if pattern_matches(p, site):
            return False, f"excluded by scope.exclude {p!r}"
    return True, "in scope"


def _quoted(patterns: Iterable[str]) -> str:
    return ", ".join(f"'{p}'" for p in patterns)  # not repr(): keep regex backslashes single


def _resolve(policy: Policy, sites: Iterable[Site]) -> Resolution:
    sites = list(sites)
    out: list[SiteResolution] = []
    applied: set[int] = set()
    fixed_used: set[int] = set()
    for site in sites:
        entry = next((i for i, f in enumerate(policy.fixed) if any(pattern_matches(p, site) for p in f.patterns)), None)
        if entry is not None:
            fixed_used.add(entry)
            p = policy.fixed[entry].precision
            out.append(SiteResolution(site, False, f"fixed at {p.describe()}, outside the budget", None,
                                      policy.fixed_label(entry), fixed=p))
            continue
        ok, reason = in_scope(policy.scope, site)
        if not ok:
            out.append(SiteResolution(site, False, reason))
            continue
        for i, rule in enumerate(policy.rules):
            if any(pattern_matches(p, site) for p in rule.patterns):
                applied.add(i)
                out.append(SiteResolution(site, True, reason, i, policy.rule_label(i), tuple(rule.allowed_formats())))
                break
        else:
            out.append(SiteResolution(site, True, reason, None, "default_formats", tuple(policy.default_formats)))

    messages: list[str] = []
    unmatched = tuple(i for i in range(len(policy.rules)) if i not in applied)
    for i in unmatched:
        rule = policy.rules[i]
        hits = [s for s in sites if any(pattern_matches(p, s) for p in rule.patterns)]
        label = f"rules[{i}]" + (f" ({rule.name!r})" if rule.name else "")
        pats = _quoted(rule.patterns)
        if not hits:
            why = "matches no site"
        elif not any(in_scope(policy.scope, s)[0] for s in hits):
            why = f"matches only out-of-scope sites (e.g. {hits[0].name})"
        else:
            why = "matches only sites that earlier rules already claim (first match wins)"
        messages.append(f"{label} {pats}: {why}")
    for i, f in enumerate(policy.fixed):
        if i not in fixed_used:
            claimed = any(pattern_matches(p, s) for p in f.patterns for s in sites)
            why = "matches only sites that earlier fixed entries already claim" if claimed else "matches no site"
            messages.append(f"{policy.fixed_label(i)} {_quoted(f.patterns)}: {why}")
    for key in ("include", "exclude"):
        pats = getattr(policy.scope, key)
        if pats and not any(pattern_matches(p, s) for p in pats for s in sites):
            messages.append(f"scope.{key} [{_quoted(pats)}]: matches no site")
    return Resolution(policy, tuple(out), unmatched, tuple(messages))


def resolve(policy: Policy, sites: Iterable[Site], *, warn: bool = True) -> Resolution:
    """Apply ``policy`` to ``sites``: scope, matching rule and allowed formats for each site.

    Problems that are probably mistakes (a rule applying to no site, a scope pattern list matching
    nothing) are returned in ``Resolution.warnings`` and, with ``warn``, raised as `PolicyWarning`.
    """
    res = _resolve(policy, sites)
    if warn:
        for m in res.warnings:
            warnings.warn(m, PolicyWarning, stacklevel=2)
    return res
