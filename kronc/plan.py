"""Plans: one decision per site, printable, serialisable and replayable with `kronc.apply`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from .budget import Budget
from .formats import AnySpec
from .sites import Site


class Decision(BaseModel):
    """The format chosen for one site, and what it costs."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(description="Qualified name of the site's weight parameter.")
    shape: tuple[int, int] = Field(description="Logical (out, in) shape of the weight.")
    spec: AnySpec = Field(description="The chosen format and its parameters.")
    bytes_before: int = Field(description="Dense bytes of the weight.")
    bytes_after: int = Field(description="Stored bytes in the chosen format, indices included.")
    params_after: int = Field(description="Stored values in the chosen format.")
    error: float | None = Field(default=None, description="Estimated relative error ||W - W'|| / ||W|| (weight or data-aware).")
    rule: str | None = Field(default=None, description="The policy rule that allowed this format.")
    budgeted: bool = Field(default=True, description="Whether the site counts in the budget (false: a policy's "
                           "`fixed` entry stored it at a fixed precision outside it).")

    @classmethod
    def of(cls, site: Site, spec: AnySpec, **fields: Any) -> Decision:
        """``site`` stored as ``spec``: its sizes (dense bytes, stored bytes and values) derived from the spec."""
        return cls(site=site.name, shape=site.shape, spec=spec, bytes_before=site.nbytes,
                   bytes_after=spec.nbytes(site.shape, site.itemsize), params_after=spec.nparams(site.shape), **fields)

    @model_serializer(mode="wrap")
    def _drop_default_budgeted(self, handler: SerializerFunctionWrapHandler) -> dict:
        """Plans without fixed sites stay byte-identical to those written before `budgeted` existed."""
        out = handler(self)
        if isinstance(out, dict) and out.get("budgeted", False) is True:
            out.pop("budgeted")
        return out

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(1, self.bytes_after)

    @property
    def values(self) -> str:
        """Bits of the stored values: ``keep`` (the weight's dtype) or the precision (``int4g32``)."""
        p = self.spec.precision
        return "keep" if p is None else p.describe()


class Plan(BaseModel):
    """A compression plan for a model: replay it with `kronc.apply(model, plan)`."""

    model_config = ConfigDict(extra="forbid")

    decisions: list[Decision]
    budget: Budget | None = Field(default=None, description="The budget the plan was made for, as written.")
    objective: str = Field(default="weight", description="What the error estimates measure.")
    kronc_version: str = Field(default="0.1.0")

    def __getitem__(self, site: str) -> Decision:
        for d in self.decisions:
            if d.site == site:
                return d
        raise KeyError(f"no decision for site {site!r}; the plan covers: {', '.join(self.sites)}")

    @property
    def sites(self) -> list[str]:
        return [d.site for d in self.decisions]

    @property
    def bytes_before(self) -> int:
        """Dense bytes of the budgeted sites (what a ratio budget is over)."""
        return sum(d.bytes_before for d in self.decisions if d.budgeted)

    @property
    def bytes_after(self) -> int:
        """Stored bytes of the budgeted sites."""
        return sum(d.bytes_after for d in self.decisions if d.budgeted)

    @property
    def ratio(self) -> float:
        """The budget's ratio: dense over stored bytes of the budgeted sites (fixed sites not counted)."""
        return self.bytes_before / max(1, self.bytes_after)

    @property
    def total_ratio(self) -> float:
        """Dense over stored bytes of every site in the plan, fixed ones (outside the budget) included."""
        return sum(d.bytes_before for d in self.decisions) / max(1, sum(d.bytes_after for d in self.decisions))

    def table(self) -> str:
        """A fixed-width table of every decision with a total line."""
        head = ("site", "shape", "format", "values", "before", "after", "ratio", "error", "rule")
        rows = [
            (
                d.site, f"{d.shape[0]}x{d.shape[1]}", d.spec.describe(), d.values, _size(d.bytes_before),
                _size(d.bytes_after),
                f"{d.ratio:.1f}x", "-" if d.error is None else f"{d.error:.3f}", d.rule or "-",
            )
            for d in self.decisions
        ]
        fixed = [d for d in self.decisions if not d.budgeted]
        rows.append(("total" + (" (budget)" if fixed else ""), "", "", "", _size(self.bytes_before), _size(self.bytes_after),
                     f"{self.ratio:.2f}x", "", ""))
        if fixed:
            before, after = self.bytes_before + sum(d.bytes_before for d in fixed), self.bytes_after + sum(d.bytes_after for d in fixed)
            rows.append(("total (with fixed)", "", "", "", _size(before), _size(after), f"{self.total_ratio:.2f}x", "", ""))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return self.table()

    def save(self, path: str | Path) -> None:
        """Write as JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        path = Path(path)
        data = self.model_dump(mode="json")
        text = yaml.safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(data, indent=1)
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        return cls.model_validate(data)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n}B"
