"""Budgets: how small the in-scope weights must become.

Three spellings, all of the in-scope weight matrices only (biases, norms and out-of-scope weights
are not counted):

* a ratio, ``"25x"`` (or ``25.0``): in-scope weight bytes shrink by at least that factor;
* a size, ``"40MB"``, ``"512KiB"``, ``"1.5GB"`` (decimal ``kB/MB/GB``, binary ``KiB/MiB/GiB``):
  in-scope weight bytes after compression at most that;
* a parameter count, ``"3M params"`` / ``"250k params"``: stored values (indices excluded) at most that.

`Budget` is a pydantic field type (`Policy.budget`, `Plan.budget`): it validates from its spelling and
serializes back to exactly that spelling, so policy and plan files round-trip as written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_COUNT = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


class BudgetError(ValueError):
    """A budget that cannot be parsed or cannot be met."""


Unit = Literal["ratio", "bytes", "params"]


@dataclass(frozen=True, eq=False, repr=False)
class Budget:
    """A parsed budget; build with `Budget.parse` (or from a unit and a positive finite value)."""

    unit: Unit
    value: float
    text: str | None = None
    """The user's spelling, so printing a budget gives back what was asked for (``str`` re-parses)."""

    def __post_init__(self) -> None:
        if self.unit not in ("ratio", "bytes", "params"):
            raise BudgetError(f"budget unit must be 'ratio', 'bytes' or 'params', got {self.unit!r}")
        value = self.value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise BudgetError(f"budget value must be a positive finite number, got {value!r}")
        object.__setattr__(self, "value", float(value))

    def __repr__(self) -> str:
        return f"Budget({str(self)!r})"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        """Validate from a spelling (or a Budget); serialize to the spelling (JSON and Python alike)."""
        return core_schema.no_info_plain_validator_function(
            cls.parse, serialization=core_schema.plain_serializer_function_ser_schema(str, return_schema=core_schema.str_schema()),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {"type": "string"}

    def __eq__(self, other: object) -> bool:  # the spelling is not part of the value
        if not isinstance(other, Budget):
            return NotImplemented
        return (self.unit, self.value) == (other.unit, other.value)

    def __hash__(self) -> int:
        return hash((self.unit, self.value))

    @classmethod
    def parse(cls, text: str | float | int | Budget) -> Budget:
        if isinstance(text, Budget):
            return text
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            if not math.isfinite(text):
                raise BudgetError(f"budget {text!r} is not a finite number: use a ratio such as 25 or '25x'")
            return cls._ratio(float(text), f"{text!r}x")
        if not isinstance(text, str):
            raise BudgetError(f"budget must be a string like '25x', '40MB' or '3M params', got {type(text).__name__}")
        s = text.strip().lower().replace("_", "").replace(",", "")
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+)\s*x", s):
            return cls._ratio(float(m.group(1)), text.strip())
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(b|kb|mb|gb|kib|mib|gib)", s):
            return cls._amount("bytes", float(m.group(1)) * _UNITS[m.group(2)], text.strip(), "byte")
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmbg]?)\s*(params|parameters)", s):
            return cls._amount("params", float(m.group(1)) * _COUNT[m.group(2)], text.strip(), "parameter")
        raise BudgetError(
            f"cannot read budget {text!r}: use a ratio ('25x'), a size ('40MB', '512KiB') or a count ('3M params')"
        )

    @classmethod
    def _ratio(cls, value: float, text: str) -> Budget:
        if not math.isfinite(value):
            raise BudgetError(f"budget {text!r} is not a finite number: use a ratio such as '25x'")
        if value < 1:
            raise BudgetError(f"budget ratio {text!r} must be at least 1x (it is how many times smaller)")
        return cls(unit="ratio", value=value, text=text)

    @classmethod
    def _amount(cls, unit: Literal["bytes", "params"], value: float, text: str, what: str) -> Budget:
        # A budget under one byte/parameter leaves nothing to store (and would print as "0B").
        if not math.isfinite(value) or value < 1:
            raise BudgetError(f"budget {text!r} must allow at least one {what}")
        return cls(unit=unit, value=value, text=text)

    def limit(self, dense_bytes: int, dense_params: int) -> tuple[Literal["bytes", "params"], float]:
        """The cap this budget puts on the in-scope total, in bytes or in stored parameters."""
        if self.unit == "ratio":
            return "bytes", dense_bytes / self.value
        return ("bytes" if self.unit == "bytes" else "params"), self.value

    def __str__(self) -> str:
        if self.text is not None:
            return self.text
        number = f"{self.value:.17g}"  # every digit: str(budget) parses back to the same value
        if self.unit == "ratio":
            return f"{number}x"
        if self.unit == "bytes":
            return f"{number}B"
        return f"{number} params"
