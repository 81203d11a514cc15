"""Problems with a policy: `PolicyError` (cannot be used) and `PolicyWarning` (probably a mistake)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy, located by file and key path."""

    source: str
    """Where the policy came from: a file path, or ``<dict>`` for data built in Python."""
    path: str
    """Key path inside the policy, e.g. ``rules[2].formats[0].density_max`` (``""``: the whole file)."""
    message: str
    """What is wrong, in words."""
    line: int | None = None
    """1-based line of a syntax error (validation problems are located by ``path`` instead)."""
    column: int | None = None
    """1-based column of a syntax error."""

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}" + (f":{self.column}" if self.column is not None else "")
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(ValueError):
    """A policy that cannot be read or validated; the message has one line per problem."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class PolicyWarning(UserWarning):
    """A valid policy that is probably not what was meant (e.g. a rule that matches no site)."""
