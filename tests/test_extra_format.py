"""A format defined here, registered from outside kronc, goes through plan, apply, save and load.

The format keeps the first ``rows`` output rows of a weight (the rest are zero): a spec and module
(what ``kronc/formats/<fmt>.py`` holds) and a planning family (what ``kronc/planning/families/<fmt>.py``
holds), registered with `register_format` and `register_family` and no other edit (docs/formats.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import Field
from torch import Tensor, nn

import kronc
from kronc.formats import FORMATS, Factorized, FormatError, FormatSpec, Shape, register_format
from kronc.plan import Plan
from kronc.planning.estimate import SiteAnalysis
from kronc.planning.families import FAMILIES, Choice, Family, register_family
from kronc.planning.options import SearchOptions


class FirstRowsSpec(FormatSpec):
    """Keep the first ``rows`` rows of the weight."""

    kind: Literal["firstrows"] = "firstrows"
    rows: int = Field(ge=1)

    def check(self, shape: Shape) -> None:
        if self.rows > shape[0]:
            raise FormatError(f"firstrows rows={self.rows} exceeds the {shape[0]} rows of the weight")

    def nbytes(self, shape: Shape, itemsize: int) -> int:
        return self.nparams(shape) * itemsize

    def nparams(self, shape: Shape) -> int:
        return self.rows * shape[1]

    def flops_per_token(self, shape: Shape) -> int:
        return 2 * self.rows * shape[1]


class FirstRows(Factorized):
    spec_type = FirstRowsSpec

    def __init__(self, kept: Tensor, out_features: int, spec: FirstRowsSpec) -> None:
        super().__init__(spec, (out_features, kept.shape[1]))
        self.kept = nn.Parameter(kept.contiguous())

    @classmethod
    def fit(cls, weight: Tensor, spec: FormatSpec) -> FirstRows:
        assert isinstance(spec, FirstRowsSpec)
        spec.check(tuple(weight.shape))  # type: ignore[arg-type]
        return cls(weight.detach()[: spec.rows].clone(), weight.shape[0], spec)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        y = x @ self.kept.T
        y = torch.cat([y, y.new_zeros(*y.shape[:-1], self.shape[0] - self.kept.shape[0])], dim=-1)
        return y if bias is None else y + bias

    def rows(self, index: Tensor) -> Tensor:
        return self.to_dense()[index]

    def to_dense(self) -> Tensor:
        return torch.cat([self.kept, self.kept.new_zeros(self.shape[0] - self.kept.shape[0], self.shape[1])])


class FirstRowsChoice(Choice):
    """Keep a fraction of the rows."""

    kind: Literal["firstrows"] = "firstrows"
    fractions: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75])
    """Fractions of the rows to try."""


class FirstRowsFamily(Family):
    kind = "firstrows"
    choice = FirstRowsChoice

    def structures(self, shape: Shape, choice: Choice, options: SearchOptions) -> Iterable[FormatSpec]:
        assert isinstance(choice, FirstRowsChoice)
        return [FirstRowsSpec(rows=max(1, round(f * shape[0]))) for f in choice.fractions]

    def errors(self, analysis: SiteAnalysis, specs: Sequence[FormatSpec]) -> list[float]:
        w = analysis.w32.double()
        return [analysis.rel(float(w[s.rows:].square().sum())) for s in specs]  # type: ignore[attr-defined]


@pytest.fixture
def firstrows() -> Iterator[None]:
    register_format(FirstRows)
    register_family(FirstRowsFamily())
    yield
    FAMILIES.pop("firstrows")  # leave the built-in registry as the other tests expect it
    FORMATS.pop("firstrows")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24))


def test_registered_format_plans_applies_saves_and_loads(firstrows: None, tmp_path: Path) -> None:
    model = make_model()
    policy = {"budget": "1.5x", "rules": [{"match": "*", "formats": [{"kind": "firstrows"}]}]}
    plan = kronc.plan(model, policy)
    assert {d.spec.kind for d in plan.decisions} == {"firstrows"} and plan.ratio >= 1.5
    for d in plan.decisions:
        weight = model.get_parameter(d.site).detach()
        expected = float(weight[d.spec.rows:].norm() / weight.norm())  # type: ignore[attr-defined]
        assert d.error == pytest.approx(expected, rel=1e-5)
    assert Plan.model_validate_json(plan.model_dump_json()) == plan  # plans serialize through the registry

    small = kronc.apply(model, plan)
    x = torch.randn(5, 16)
    expected = model(x)
    assert not torch.equal(small(x), expected)  # rows were dropped ...
    pruned = make_model()
    with torch.no_grad():
        for d in plan.decisions:
            pruned.get_parameter(d.site)[d.spec.rows:] = 0  # type: ignore[attr-defined]
    assert torch.allclose(small(x), pruned(x), atol=1e-6)  # ... exactly those the plan names

    kronc.save(small, tmp_path / "small")
    loaded = kronc.load(tmp_path / "small", make_model)
    assert isinstance(loaded[0].weight_format, FirstRows)
    assert torch.equal(loaded(x), small(x))
    assert "firstrows" in str(kronc.explain(policy, model))


def test_policy_rejects_the_format_once_unregistered() -> None:
    with pytest.raises(kronc.PolicyError, match="firstrows"):
        kronc.load_policy({"budget": "2x", "rules": [{"match": "*", "formats": [{"kind": "firstrows"}]}]})
