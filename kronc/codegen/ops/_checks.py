"""The shared op-input checks now live in `kronc.codegen.checks.common`; re-exported for op modules that import them from here."""

from __future__ import annotations

from ..checks.common import *  # noqa: F403
from ..checks.common import OpInputError

__all__ = ["OpInputError"]
