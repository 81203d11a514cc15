"""`fit_sites`, the fit stage of `kronc.compile`: dense GPTQ sites are fitted together (`encode_many`) and
come out exactly as `fit_site` fits each; other specs go through `fit_site` unchanged."""

from __future__ import annotations

import torch

from kronc.formats import Dense, DenseSpec, LowRankSpec
from kronc.planning import fit_site, fit_sites
from kronc.values import Precision, QuantizedTensor


def test_fit_sites_equals_fit_site_each() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g) @ (torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g))
    h = x.T @ x / 300
    rot = DenseSpec(precision=Precision(dtype="int3", group_size=32, symmetric=False, fit="gptq", rotate=True))
    items = [
        (torch.randn(16, 64, generator=g), rot, h),
        (torch.randn(8, 64, generator=g), rot, h.clone()),  # the same input as the first: fitted with it
        (torch.randn(8, 64, generator=g), rot, None),  # no moments: the data-free fallback
        (torch.randn(16, 64, generator=g), DenseSpec(precision=Precision(dtype="int4", group_size=32, fit="hqq")), h),
        (torch.randn(16, 64, generator=g), LowRankSpec(rank=4), h),
    ]
    ticks: list[int] = []
    got = fit_sites(items, done=ticks.append)
    assert sorted(ticks) == list(range(len(items)))
    for (w, spec, m), fitted in zip(items, got, strict=True):
        want = fit_site(w, spec, m)
        assert type(fitted) is type(want) and fitted.spec == spec
        assert torch.equal(fitted.to_dense(), want.to_dense())
        assert fitted.state_dict().keys() == want.state_dict().keys()
    assert isinstance(got[0], Dense) and isinstance(got[0].weight, QuantizedTensor)
    assert got[0].weight.precision == rot.precision and got[0].nbytes() == 2 * got[1].nbytes()  # 16 rows vs 8
