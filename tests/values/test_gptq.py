"""GPTQ in one implementation (`kronc.values.gptq`): the batched column loop equals one fit per member,
bit for bit; a weight already on its grid comes back exact; and `encode_many`, which fits sites sharing an
input together (stacked rows, one rotation and inverse per Gram matrix), gives what `encode` gives each."""

from __future__ import annotations

import pytest
import torch

from kronc.values import Precision, PrecisionError, decode, encode, encode_many, fit_gptq, gptq_batch
from kronc.values.gptq import gptq_hinv, gptq_residuals


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grams(inn: int, seed: int = 0) -> list[torch.Tensor]:
    """Two Gram matrices of correlated inputs with a dominant channel and a dead one (as calibration
    folds), so that error propagation matters and the dead-input path runs."""
    x = torch.randn(400, inn, generator=gen(seed)) @ (torch.eye(inn) + 0.3 * torch.randn(inn, inn, generator=gen(seed + 1)) / inn**0.5)
    x[:, 5] *= 30.0
    x[:, 7] = 0.0
    return [x[:200].T @ x[:200], x[200:].T @ x[200:]]


MIXED = [
    Precision(dtype="int3", group_size=32, symmetric=False, fit="gptq"),
    Precision(dtype="int3", group_size=64, symmetric=False, fit="gptq"),
    Precision(dtype="int4", group_size=32, fit="gptq"),
    Precision(dtype="int2", group_size=128, symmetric=False, fit="gptq"),
    Precision(dtype="int8", fit="gptq"),  # one scale per row, taken from the whole row first
]


def same(a: object, b: object) -> bool:
    ma, mb = a.minimum, b.minimum  # type: ignore[attr-defined]
    return (torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)  # type: ignore[attr-defined]
            and (ma is None and mb is None or ma is not None and mb is not None and torch.equal(ma, mb)))


def test_batch_of_mixed_members_equals_one_fit_each() -> None:
    """Bit widths, symmetry, group sizes (and per-row int8) and two Gram matrices in one column loop."""
    w = torch.randn(16, 128, generator=gen(1))
    hs = grams(128)
    hinvs = [gptq_hinv(h) for h in hs]
    members = [(p, hinvs[k % 2]) for k, p in enumerate(MIXED)]
    got = gptq_batch(w, members)
    for (p, hinv), lv, k in zip(members, got, range(len(members)), strict=True):
        want = fit_gptq(w, p, hs[k % 2], hinv=hinv)
        assert same(lv, want), p.describe()
        assert lv.q.shape == want.q.shape and (lv.values().reshape(w.shape) - w).abs().max() > 0
    resid = gptq_residuals(w, members)  # the planner's form: decoded minus the weight
    assert torch.equal(resid[1], got[1].values().reshape(w.shape).double() - w.double())


def test_weights_on_their_grid_come_back_exact() -> None:
    """One weight per member, each already on its member's grid (exact structure): zero error, so nothing
    is propagated, in the batch as alone."""
    hinv = gptq_hinv(grams(128)[0])
    ps = MIXED[:4]
    w = torch.stack([decode(encode(torch.randn(16, 128, generator=gen(k)) * 0.05, p.model_copy(update={"fit": "rtn"})))
                     for k, p in enumerate(ps)])
    for k, lv in enumerate(gptq_batch(w, [(p, hinv) for p in ps])):
        assert torch.equal(lv.values().reshape(16, 128), w[k])


def test_stacked_rows_equal_separate_fits() -> None:
    """Rows of several weights stacked in one member, split into parts: each part's levels equal the fit
    of that weight alone (odd row counts included: each part keeps its own block product)."""
    h = grams(128, seed=3)[0]
    hinv = gptq_hinv(h)
    p = MIXED[1]
    ws = [torch.randn(r, 128, generator=gen(10 + r)) for r in (13, 32, 5)]
    lv = gptq_batch(torch.cat(ws), [(p, hinv)], splits=[[13, 32, 5]])[0]
    start = 0
    for w in ws:
        want = fit_gptq(w, p, h, hinv=hinv)
        r = w.shape[0]
        assert torch.equal(lv.q[start:start + r], want.q) and torch.equal(lv.scale[start:start + r], want.scale)
        start += r
    with pytest.raises(PrecisionError, match="splits"):
        gptq_batch(torch.cat(ws), [(p, hinv)], splits=[[13, 32]])
    with pytest.raises(PrecisionError, match="hinv must be"):
        gptq_batch(ws[0], [(p, hinv[:64, :64])])


def test_encode_many_equals_encode_each() -> None:
    """Sites sharing one input (equal, not identical, Gram matrices), rotated and not, at several
    precisions, next to a site with its own input and a data-free one: the same codes as one `encode` each."""
    h_shared, h_other = grams(128, seed=5)
    rot = Precision(dtype="int3", group_size=64, symmetric=False, fit="gptq", rotate=True)
    items = [
        (torch.randn(24, 128, generator=gen(20)), rot, h_shared),
        (torch.randn(8, 128, generator=gen(21)), rot, h_shared.clone()),
        (torch.randn(8, 128, generator=gen(22)), MIXED[0], h_shared.clone()),
        (torch.randn(24, 128, generator=gen(23)), rot, h_other),
        (torch.randn(8, 128, generator=gen(24)), Precision(dtype="int4", group_size=32, fit="hqq"), h_other),
    ]
    wants = [encode(w, p, h) for w, p, h in items]
    for workers in (1, 2):  # the column loops on threads give the same codes
        ticks: list[int] = []
        got = encode_many(items, done=ticks.append, workers=workers)
        assert sorted(ticks) == list(range(len(items)))
        for (_, p, _), e, want in zip(items, got, wants, strict=True):
            assert e.shape == want.shape and e.precision == p
            for a, b in ((e.codes, want.codes), (e.scales, want.scales), (e.minima, want.minima)):
                assert (a is None and b is None) or torch.equal(a, b), p.describe()
