"""Budgets: how small the in-scope weights must become.

Three spellings, all of the in-scope weight matrices only (biases, norms and out-of-scope weights
are not counted):

* a ratio, ``"25x"`` (or ``25.0``): in-scope weight bytes shrink by at least that factor;
* a size, ``"40MB"``, ``"512KiB"``, ``"1.5GB"`` (decimal ``kB/MB/GB``, binary ``KiB/MiB/GiB``):
  in-scope weight bytes after compression at most that;
* a parameter count, ``"3M params"`` / ``"250k params"``: stored values (indices excluded) at most that.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_COUNT = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


class BudgetError(ValueError):
    """A budget that cannot be parsed or cannot be met."""


class Budget(BaseModel):
    """A parsed budget; build with `Budget.parse`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: Literal["ratio", "bytes", "params"]
    value: float = Field(gt=0)

    @classmethod
    def parse(cls, text: str | float | int | Budget) -> Budget:
        if isinstance(text, Budget):
            return text
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            return cls._ratio(float(text), repr(text))
        if not isinstance(text, str):
            raise BudgetError(f"budget must be a string like '25x', '40MB' or '3M params', got {type(text).__name__}")
        s = text.strip().lower().replace("_", "").replace(",", "")
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+)\s*x", s):
            return cls._ratio(float(m.group(1)), text)
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(b|kb|mb|gb|kib|mib|gib)", s):
            return cls(unit="bytes", value=float(m.group(1)) * _UNITS[m.group(2)])
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmbg]?)\s*(params|parameters)", s):
            return cls(unit="params", value=float(m.group(1)) * _COUNT[m.group(2)])
        raise BudgetError(
            f"cannot read budget {text!r}: use a ratio ('25x'), a size ('40MB', '512KiB') or a count ('3M params')"
        )

    @classmethod
    def _ratio(cls, value: float, text: str) -> Budget:
        if value < 1:
            raise BudgetError(f"budget ratio {text!r} must be at least 1x (it is how many times smaller)")
        return cls(unit="ratio", value=value)

    def limit(self, dense_bytes: int, dense_params: int) -> tuple[Literal["bytes", "params"], float]:
        """The cap this budget puts on the in-scope total, in bytes or in stored parameters."""
        if self.unit == "ratio":
            return "bytes", dense_bytes / self.value
        return ("bytes" if self.unit == "bytes" else "params"), self.value

    def __str__(self) -> str:
        if self.unit == "ratio":
            return f"{self.value:g}x"
        if self.unit == "bytes":
            return f"{round(self.value)}B"
        return f"{round(self.value)} params"
