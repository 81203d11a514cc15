"""Rotated precisions (`kronc.values.rotation`, ``Precision.rotate``): ``R`` orthogonal and derived from a
fixed seed only, exact round trips for weights whose ``W R`` is on the grid, the dense format and
``kronc::quant_linear`` against the plain reference, GPTQ fitted in the rotated basis, the planner's
estimate, compile/export, save/load, and policies that allow or forbid it."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import kronc
from kronc.capture import capture
from kronc.formats import Dense, DenseSpec, FormatError, LowRankSpec, QuantLowRankSpec
from kronc.plan import Decision, Plan
from kronc.planning.estimate import SiteAnalysis
from kronc.planning.families import LowRankChoice
from kronc.policies import Policy
from kronc.policies.model import Rule
from kronc.tools.toy import TOY_MODELS, toy_inputs
from kronc.values import Precision, QuantizedTensor, decode, encode, encode_levels, fit_gptq
from kronc.values import rotation as rot

DIMS = [576, 1536, 384, 96, 100, 7]
ROT = [
    Precision(dtype="int3", group_size=64, symmetric=False, fit="hqq", rotate=True),
    Precision(dtype="int4", group_size=32, rotate=True),
    Precision(dtype="int2", group_size=32, symmetric=False, rotate=True),
    Precision(dtype="int8", rotate=True),
    Precision(dtype="int3", symmetric=False, fit="hqq", rotate=True),  # one scale per row
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("inn", DIMS)
def test_rotation_is_orthogonal_hadamard_and_matches_its_matrix(inn: int, full: bool) -> None:
    r = rot.matrix(inn, full=full)
    b = math.prod(rot.factors(inn, full))
    assert inn % b == 0 and b == (inn if full and inn % 96 == 0 else rot.block_size(inn))  # 576, 1536, 384, 96: one block
    torch.testing.assert_close(r.T @ r, torch.eye(inn, dtype=r.dtype), rtol=0, atol=1e-13)
    nonzero = r[r != 0].abs()
    assert nonzero.numel() == inn * b and torch.allclose(nonzero, torch.full_like(nonzero, b ** -0.5), rtol=1e-15, atol=0)
    x = torch.randn(3, 2, inn, generator=gen(1), dtype=torch.float64)
    torch.testing.assert_close(rot.rotate(x, full=full), x @ r, rtol=0, atol=1e-12)
    torch.testing.assert_close(rot.unrotate(x, full=full), x @ r.T, rtol=0, atol=1e-12)
    h = x.reshape(-1, inn).T @ x.reshape(-1, inn)
    torch.testing.assert_close(rot.rotate_gram(h, full=full), r.T @ h @ r, rtol=0, atol=1e-10)


def test_powers_of_four_blocks_are_exact_in_float32() -> None:
    """Blocks of 4^k have entries 2^-k: ``Rᵀ R`` is the identity exactly (576 takes blocks of 64)."""
    r = rot.matrix(576, full=False, dtype=torch.float32)
    assert torch.equal(r.T @ r, torch.eye(576))


def test_signs_depend_on_the_seed_only() -> None:
    """The signs are a pure function of (dimension, seed), pinned here: a saved rotated model decodes
    with them, so they must never change with torch's generator or the device."""
    s = rot.signs(576)
    assert torch.equal(s, rot.signs(576)) and set(s.tolist()) == {-1.0, 1.0}
    assert abs(float(s.mean())) < 0.1
    digest = hashlib.sha256(bytes(int(v > 0) for v in rot.signs(1536).tolist())).hexdigest()[:16]
    assert digest == PINNED_SIGNS, digest
    assert not torch.equal(rot.signs(576, seed=1), s)
    # the tensor hash is the plain 32-bit integer hash (no int64 overflow anywhere)
    mixed = rot._hash32(rot.SEED)
    by_int = [1.0 if rot._hash32((i + mixed) & 0xFFFFFFFF) >> 31 else -1.0 for i in range(1536)]
    assert rot.signs(1536).tolist() == by_int


PINNED_SIGNS = "18401cb85ed16438"
"""sha256 of the 1536 signs of the fixed seed (a regression pin: changing the sign rule breaks saved models)."""


def grid_rotated(p: Precision, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A weight whose ``W R`` is on ``p``'s grid: the decoding of a rotated encoding of random data."""
    return decode(encode(torch.randn(*shape, generator=gen(seed)) * 0.05, p.model_copy(update={"fit": "rtn"})))


@pytest.mark.parametrize("fit", ["rtn", "hqq", "gptq"])
@pytest.mark.parametrize("p", ROT, ids=[p.describe() for p in ROT])
def test_weight_whose_rotation_is_on_the_grid_comes_back_exact(p: Precision, fit: str) -> None:
    p = p.model_copy(update={"fit": fit})
    w = grid_rotated(p, (16, 192))
    x = torch.randn(64, 192, generator=gen(3))
    e = encode(w, p, x.T @ x)
    assert torch.equal(decode(e), w), float((decode(e) - w).abs().max())
    plain = encode(w, p.model_copy(update={"rotate": False}), x.T @ x)
    assert not torch.equal(decode(plain), w)  # the unrotated grid does not hold it
    assert e.nbytes() == p.nbytes((16, 192)) == plain.nbytes()  # rotation stores nothing extra


def test_rotation_helps_a_weight_with_outlier_columns() -> None:
    """Outliers concentrated in a few input columns: the rotated int3 fit has a much smaller error."""
    w = torch.randn(64, 256, generator=gen(4))
    w[:, ::37] *= 12
    plain = Precision(dtype="int3", group_size=64, symmetric=False, fit="hqq")
    rotated = plain.model_copy(update={"rotate": True})
    err = {p.rotate: float((decode(encode(w, p)) - w).norm()) for p in (plain, rotated)}
    assert err[True] < 0.7 * err[False], err


def test_rotation_makes_one_scale_per_row_affordable() -> None:
    """Outlier columns stretch a row-wide range; rotated, the row is even and one scale per row (fewer
    bytes than groups of 128) fits better than unrotated groups of 64."""
    w = torch.randn(64, 256, generator=gen(5))
    w[:, ::29] *= 10
    row = Precision(dtype="int3", symmetric=False, fit="hqq")
    err = {name: float((decode(encode(w, p)) - w).norm()) for name, p in (
        ("row", row), ("row-rot", row.model_copy(update={"rotate": True})),
        ("g64", row.model_copy(update={"group_size": 64})))}
    assert err["row-rot"] < 0.6 * err["row"] and err["row-rot"] < err["g64"], err
    assert row.nbytes((64, 256)) < row.model_copy(update={"group_size": 128}).nbytes((64, 256))


def test_gptq_fits_in_the_rotated_basis() -> None:
    """encode's GPTQ for a rotated precision is GPTQ of ``W R`` with ``Rᵀ H R``, and beats the rotated RTN
    on the calibration output error."""
    w = torch.randn(32, 128, generator=gen(5))
    x = torch.randn(512, 128, generator=gen(6)) @ torch.randn(128, 128, generator=gen(7))
    h = x.T @ x
    p = Precision(dtype="int3", group_size=32, symmetric=False, fit="gptq", rotate=True)
    got = encode(w, p, h)
    want = encode_levels(fit_gptq(rot.rotate(w), p, rot.rotate_gram(h.double())), p, tuple(w.shape))
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    rtn = decode(encode(w, p.model_copy(update={"fit": "rtn"})))
    out = {name: float(((v - w) @ x.T).norm()) for name, v in (("gptq", decode(got)), ("rtn", rtn))}
    assert out["gptq"] < 0.9 * out["rtn"], out


@pytest.mark.parametrize("p", ROT, ids=[p.describe() for p in ROT])
def test_quant_linear_with_rotation_matches_reference(p: Precision) -> None:
    w = torch.randn(48, 192, generator=gen(8))
    qt = QuantizedTensor.from_float(w, p)
    x = torch.randn(2, 5, 192, generator=gen(9))
    bias = torch.randn(48, generator=gen(10))
    ref = torch.nn.functional.linear(x, qt.dequantize(), bias)
    torch.testing.assert_close(qt.linear(x, bias), ref, rtol=1e-4, atol=1e-4)
    dense = Dense.fit(w, DenseSpec(precision=p))
    torch.testing.assert_close(dense(x), x @ dense.to_dense().T, rtol=1e-4, atol=1e-4)
    assert dense.nbytes() == DenseSpec(precision=p).nbytes((48, 192), 4)


def test_describe_and_bad_input() -> None:
    p = Precision(dtype="int3", group_size=64, symmetric=False, fit="hqq", rotate=True)
    assert p.describe() == "int3g64a-hqq-rot" and Precision(dtype="int4", group_size=32).describe() == "int4g32"
    assert "rotate" not in Precision(dtype="int4", group_size=32).model_dump()  # old files stay byte-identical
    assert Precision.model_validate(p.model_dump()) == p
    with pytest.raises(ValidationError, match="rotate applies to integer dtypes"):
        Precision(dtype="bf16", rotate=True)
    with pytest.raises(FormatError, match="dense format's weight only"):
        LowRankSpec(rank=4, precision=p).check((64, 64))
    with pytest.raises(ValidationError, match="dense format's weight only"):
        QuantLowRankSpec(base=p, rank=4)
    with pytest.raises(ValidationError, match="format 'lowrank'.*int3g64a-hqq-rot"):
        LowRankChoice(precisions=[p])


def test_planner_estimate_of_a_rotated_precision_tracks_its_fit() -> None:
    """Weight and data-aware estimates of a rotated dense precision: the clip search of ``W R`` rotated
    back, so within 10% of the fitted error (HQQ's zero-point step only lowers it)."""
    w = torch.randn(64, 192, generator=gen(11))
    w[:, ::29] *= 8
    x = torch.randn(400, 192, generator=gen(12))
    h = x.T @ x
    specs = [DenseSpec(precision=p) for p in ROT[:3]]
    for moments in (None, h):
        an = SiteAnalysis(w, moments, damping=0.01)
        for spec, est in zip(specs, an.errors(specs), strict=True):
            e = (Dense.fit(w, spec).to_dense().detach() - w).double()
            real = float((e.square().sum() if moments is None else ((e @ an.h) * e).sum()) / an.total) ** 0.5
            assert real <= est * 1.001 + 1e-9 and est < 1.1 * real, (spec.describe(), moments is None, est, real)


@pytest.mark.parametrize("group", [32, None], ids=["g32", "row"])
@pytest.mark.parametrize("rotate", [False, True])
def test_planner_gptq_estimate_is_the_fit_in_sample_and_held_out_with_folds(rotate: bool, group: int | None) -> None:
    """A gptq precision is estimated by GPTQ on the sampled rows (all rows at this size): in sample it is
    the fitted error (up to the estimate's extra 1% damping); with two folds of few tokens each, the
    held-out estimate is larger (GPTQ fits its calibration tokens). Also with one scale per row."""
    w = torch.randn(48, 192, generator=gen(13))
    xa, xb = (torch.randn(96, 192, generator=gen(s)) @ torch.randn(192, 192, generator=gen(s + 1)) for s in (14, 16))
    ha, hb = xa.T @ xa / 96, xb.T @ xb / 96
    h = (ha + hb) / 2
    spec = DenseSpec(precision=Precision(dtype="int3", group_size=group, symmetric=False, fit="gptq", rotate=rotate))
    an = SiteAnalysis(w, h, damping=0.01)
    est = float(an.errors([spec])[0])
    e = (Dense.fit(w, spec, h).to_dense().detach() - w).double()
    real = float(((e @ an.h) * e).sum() / an.total) ** 0.5
    assert abs(est - real) < 0.05 * real, (est, real)
    held = float(SiteAnalysis(w, h, damping=0.01, folds=(ha, hb)).errors([spec])[0])
    assert held > 1.05 * est, (held, est)


def test_rule_rotation_limit_allows_or_forbids() -> None:
    rotated = Precision(dtype="int3", group_size=64, symmetric=False, fit="hqq", rotate=True)
    plain = rotated.model_copy(update={"rotate": False})
    listed = {"kind": "dense", "precisions": ["keep", Precision(dtype="bf16"), plain, rotated]}
    forbid = Rule(match="*", rotation=False, formats=[listed]).allowed_formats()[0].precisions
    only = Rule(match="*", rotation=True, formats=[listed]).allowed_formats()[0].precisions
    assert forbid == ["keep", Precision(dtype="bf16"), plain] and only == ["keep", Precision(dtype="bf16"), rotated]
    assert Rule(match="*", rotation=False, formats=[listed]).limits() == "no rotation"
    policy = Policy(budget="4x", rules=[Rule(match="*", rotation=False, formats=[{"kind": "dense"}])])
    again = Policy.model_validate(policy.model_dump(mode="json"))
    assert again.rules[0].rotation is False
    assert all(not p.rotate for p in again.rules[0].allowed_formats()[0].precisions if isinstance(p, Precision))


def rotated_toy_plan(captured) -> Plan:  # type: ignore[no-untyped-def]
    specs = [DenseSpec(precision=p) for p in ROT] + [LowRankSpec(rank=8, precision=Precision(dtype="int4", group_size=16))]
    decisions = []
    for i, site in enumerate(s for s in captured.sites if s.kind == "linear"):
        spec = specs[i % len(specs)]
        decisions.append(Decision.of(site, spec))
    return Plan(decisions=decisions, budget="4x")


@pytest.mark.slow
def test_rotated_model_compiles_exports_and_saves_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TOY_MODELS["llama"]()
    x = toy_inputs("llama")
    captured = capture(model, x)
    plan = rotated_toy_plan(captured)
    assert any(d.values.endswith("-rot") for d in plan.decisions)
    small = kronc.apply(captured, plan).eval()
    compiled = torch.compile(small, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        eager = small(x).logits
        torch.testing.assert_close(compiled(x).logits, eager, rtol=1e-5, atol=1e-5)
        ep = torch.export.export(small, (x,), kwargs={"use_cache": False}, strict=False)
        torch.testing.assert_close(ep.module()(x, use_cache=False).logits, eager, rtol=1e-5, atol=1e-5)
    kronc.save(small, tmp_path / "r")
    same = kronc.load(tmp_path / "r")
    before, after = small.state_dict(), same.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(same(x).logits, eager)
    rotated = [m for m in same.modules() if isinstance(m, QuantizedTensor) and m.precision.rotate]
    assert rotated and all(m.precision.describe().endswith("-rot") for m in rotated)
