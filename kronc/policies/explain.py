"""``kronc.explain(policy, model)``: which rule applied to each site, as a table."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..capture import capture
from ..sites import Site
from .choices import Choice
from .errors import PolicyWarning
from .loader import load_policy
from .match import Resolution, resolve
from .model import Policy


def describe_choice(choice: Choice) -> str:
    """A short form of one format choice, e.g. ``doped(kronecker auto, terms<=2, density 0.001-0.05)``."""
    return choice.describe()


@dataclass(frozen=True)
class Explanation:
    """For each site: in scope or not, the rule that applied, and the formats it allows."""

    resolution: Resolution

    def rows(self) -> list[tuple[str, str, str, str, str, str]]:
        rows: list[tuple[str, str, str, str, str, str]] = []
        for r in self.resolution.sites:
            s = r.site
            scope = "yes" if r.in_scope else f"no: {r.reason}"
            formats = "; ".join(describe_choice(f) for f in r.formats) or "-"
            if r.fixed is not None:
                formats = f"dense at {r.fixed.describe()} (fixed)"
            rule = r.rule or "-"
            if r.rule_index is not None and (limits := self.resolution.policy.rules[r.rule_index].limits()):
                rule += f" ({limits})"
            rows.append((s.name, s.kind, f"{s.shape[0]}x{s.shape[1]}", scope, rule, formats))
        return rows

    def table(self) -> str:
        """A fixed-width table, then one ``warning:`` line per `PolicyWarning`."""
        head = ("site", "kind", "shape", "in scope", "rule", "formats allowed")
        rows = self.rows()
        widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]
        lines += [f"warning: {m}" for m in self.resolution.warnings]
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return self.table()


def _sites_of(model_or_sites: Any) -> list[Site]:
    if isinstance(model_or_sites, torch.nn.Module):
        return list(capture(model_or_sites).sites)
    if hasattr(model_or_sites, "sites"):  # a kronc.capture.Captured
        return list(model_or_sites.sites)
    return list(model_or_sites)


def explain(
    policy: Policy | str | Path | dict[str, Any], model_or_sites: torch.nn.Module | Iterable[Site] | Any
) -> Explanation:
    """Show, for each site of a model (an ``nn.Module``, a captured model or a list of `Site`), whether
    it is in scope, which rule applied and which formats it may use. ``policy`` may be anything
    `load_policy` accepts (a `Policy`, a file, a shipped policy's name, a dict)."""
    res = resolve(load_policy(policy), _sites_of(model_or_sites), warn=False)
    for m in res.warnings:
        warnings.warn(m, PolicyWarning, stacklevel=2)
    return Explanation(res)

