"""Precision as a dimension of every format: exact bytes, one storage path, forward against to_dense,
exact round trips on the grid, fits that use H, errors that name the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kronc.formats import (
    BlockSparseSpec,
    Dense,
    DenseSpec,
    DopedSpec,
    FormatError,
    KroneckerSpec,
    LowRankSpec,
    QuantLowRankSpec,
    fit,
    parse_spec,
)
from kronc.formats.registry import empty
from kronc.values import Precision, QuantizedTensor, fit_clip, fit_rtn

SHAPE = (64, 96)

PRECISIONS = [
    None,
    Precision(dtype="bf16"),
    Precision(dtype="fp16"),
    Precision(dtype="int8"),
    Precision(dtype="int8", group_size=32, symmetric=False),
    Precision(dtype="int4", group_size=16),
    Precision(dtype="int4", group_size=32, symmetric=False),
    Precision(dtype="int3", group_size=16),
    Precision(dtype="int2", group_size=16, fit="hqq", symmetric=False),
]

STRUCTURES = [
    DenseSpec(),
    LowRankSpec(rank=16),
    KroneckerSpec(a_shape=(8, 8), terms=2),
    BlockSparseSpec(block=(16, 16), density=0.5),
    DopedSpec(base=LowRankSpec(rank=16), density=0.05),
    DopedSpec(base=KroneckerSpec(a_shape=(8, 8)), density=0.05),
    DopedSpec(density=0.1),
    QuantLowRankSpec(base=Precision(dtype="int3", group_size=32, symmetric=False), rank=8),
]


def weight(seed: int = 0, shape: tuple[int, int] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def ids(p: object) -> str:
    return "keep" if p is None else p.describe() if isinstance(p, Precision) else p.describe()  # type: ignore[attr-defined]


@pytest.mark.parametrize("precision", PRECISIONS, ids=ids)
@pytest.mark.parametrize("structure", STRUCTURES, ids=ids)
def test_spec_bytes_equal_stored_bytes(structure, precision) -> None:  # type: ignore[no-untyped-def]
    spec = structure.model_copy(update={"precision": precision})
    w = weight(1)
    m = fit(w, spec)
    assert m.nbytes() == spec.nbytes(SHAPE, 4), spec.describe()
    assert m.nparams() == spec.nparams(SHAPE), spec.describe()
    x = weight(2, (5, SHAPE[1]))
    dense = m.to_dense().float()
    torch.testing.assert_close(m(x), x @ dense.T, rtol=1e-2, atol=1e-2)
    rows = torch.tensor([0, 3, 63])
    torch.testing.assert_close(m.rows(rows).float(), dense[rows], rtol=1e-3, atol=1e-3)
    quantized = [q for q in m.modules() if isinstance(q, QuantizedTensor)]
    pruning = isinstance(structure, DopedSpec) and structure.base is None  # overlay values only: fp16
    joint = isinstance(structure, QuantLowRankSpec)  # its base is always quantized
    assert bool(quantized) == (joint or (precision is not None and not precision.is_float and not pruning))
    # an empty module of the same spec has the same buffers (what load fills)
    e = empty(spec, SHAPE, torch.float32)
    assert {k: v.shape for k, v in e.state_dict().items() if "index" not in k} == {
        k: v.shape for k, v in m.state_dict().items() if "index" not in k
    }
    assert parse_spec(spec.model_dump(mode="json")) == spec


def test_float_precisions_shrink_bytes_and_keep_training() -> None:
    spec = LowRankSpec(rank=8, precision=Precision(dtype="bf16"))
    m = fit(weight(3), spec)
    assert m.nbytes() == 8 * (SHAPE[0] + SHAPE[1]) * 2
    assert all(p.requires_grad and p.dtype == torch.bfloat16 for p in m.parameters())
    m(weight(4, (3, SHAPE[1]))).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("precision", [p for p in PRECISIONS if p is not None and not p.is_float], ids=ids)
def test_dense_on_grid_comes_back_exact(precision: Precision) -> None:
    first = Dense.fit(weight(5), DenseSpec(precision=precision))
    on_grid = first.to_dense()
    again = Dense.fit(on_grid, DenseSpec(precision=precision))
    assert torch.equal(again.to_dense(), on_grid)
    assert again.nbytes() == precision.nbytes(SHAPE)


def test_lowrank_factors_on_grid_come_back_exact() -> None:
    """A rank-r matrix whose factors are on the int8 grid: quantized low rank returns the same product."""
    spec = LowRankSpec(rank=4, precision=Precision(dtype="int8"))
    u, v = weight(6, (SHAPE[0], 4)), weight(7, (4, SHAPE[1]))
    m = fit(u @ v, spec)
    again = fit(m.to_dense(), LowRankSpec(rank=4))
    assert torch.allclose(again.to_dense(), m.to_dense(), atol=1e-4)
    err = (m.to_dense() - u @ v).norm() / (u @ v).norm()
    assert err < 0.02


def test_dense_gptq_uses_h_and_beats_rtn_on_data() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, SHAPE[1]) @ torch.randn(SHAPE[1], SHAPE[1]) * 0.3
    h = x.T @ x
    w = weight(8)
    p_rtn = Precision(dtype="int3", group_size=32)
    rtn = Dense.fit(w, DenseSpec(precision=p_rtn))
    gptq = Dense.fit(w, DenseSpec(precision=p_rtn.model_copy(update={"fit": "gptq"})), h=h)

    def out_err(m: Dense) -> float:
        return float(((m.to_dense() - w) @ x.T).norm())

    assert out_err(gptq) < 0.9 * out_err(rtn)
    assert gptq.nbytes() == rtn.nbytes()


def test_bad_group_size_names_field_and_allowed() -> None:
    spec = DenseSpec(precision=Precision(dtype="int4", group_size=128))
    with pytest.raises(FormatError, match=r"group_size=128.*allowed group sizes for it: \[16, 32\]"):
        spec.check(SHAPE)  # 96 inputs
    with pytest.raises(FormatError, match="tensor 'a'"):
        KroneckerSpec(a_shape=(2, 3), terms=1, precision=Precision(dtype="int4", group_size=16)).check(SHAPE)


def test_quantized_dense_survives_dtype_casts() -> None:
    m = Dense.fit(weight(9), DenseSpec(precision=Precision(dtype="int4", group_size=32)))
    before = m.nbytes()
    m = m.double()
    assert m.nbytes() == before and m.dtype == torch.float64
    assert m.to_dense().dtype == torch.float64


# ------------------------------------------------------------------ planning, save/load, compile/export

import kronc  # noqa: E402
from kronc.capture import capture  # noqa: E402
from kronc.plan import Decision, Plan  # noqa: E402
from kronc.planning import make_plan  # noqa: E402
from kronc.planning.candidates import PlanningError  # noqa: E402
from kronc.planning.estimate import SiteAnalysis  # noqa: E402
from kronc.planning.families import DenseChoice, LowRankChoice  # noqa: E402
from kronc.tools.toy import TOY_MODELS, toy_inputs  # noqa: E402


def test_dense_quant_estimates_match_the_fit() -> None:
    """Weight metric: the estimate is the error of the fit's clip search exactly (all rows are sampled
    at this size), an upper bound of the hqq fit within 10%; data-aware (diagonal of H): within 10%."""
    w = weight(10)
    x = torch.randn(400, SHAPE[1], generator=torch.Generator().manual_seed(11)) @ torch.randn(SHAPE[1], SHAPE[1]) * 0.2
    h = x.T @ x
    specs = [DenseSpec(precision=p) for p in PRECISIONS[1:]]
    weight_est = SiteAnalysis(w).errors(specs)
    an = SiteAnalysis(w, h, damping=0.01)
    data_est = an.errors(specs)
    for spec, we, de in zip(specs, weight_est, data_est, strict=True):
        p = spec.precision
        assert p is not None
        e = (Dense.fit(w, spec).to_dense().detach() - w).double()
        fitted = float(e.norm() / w.norm())
        if p.is_float or p.fit == "rtn" or p.symmetric:  # no zero-point step: the estimate is the fit
            assert abs(fitted - we) < 1e-6, spec.describe()
        else:
            clipped = (fit_clip(w, p).values().reshape(w.shape) - w).double()
            assert abs(float(clipped.norm() / w.norm()) - we) < 1e-6, spec.describe()
            assert fitted <= we + 1e-9 and we < 1.1 * fitted, (spec.describe(), fitted, we)
        exact = float(((e @ an.h) * e).sum() / an.total) ** 0.5
        assert abs(de - exact) < 0.1 * exact + 0.1 * (we - fitted), (spec.describe(), de, exact)


def test_dense_quant_estimate_on_sampled_rows_is_close() -> None:
    """A weight with more rows than the sample: rows with very different scales, the estimate from
    the sampled rows (scaled by their energy) within 5% of the error of the whole fit."""
    w = weight(12, (1024, 256)) * torch.logspace(-1, 1, 1024)[:, None]
    for p in (Precision(dtype="int4", group_size=32, fit="hqq"), Precision(dtype="int3", group_size=64, symmetric=False),
              Precision(dtype="int8")):
        est = float(SiteAnalysis(w).errors([DenseSpec(precision=p)])[0])
        clip = fit_clip(w, p) if p.fit == "hqq" else fit_rtn(w, p)
        fitted = float((clip.values().reshape(w.shape) - w).norm() / w.norm())
        assert abs(est - fitted) < 0.05 * fitted, (p.describe(), est, fitted)


def test_dominated_pruning_candidates_are_not_estimated() -> None:
    """With the candidates' bytes, pruning densities whose rough error is far above a cheaper int4 one
    are dropped (NaN); the rest keep their exact estimate."""
    w = weight(13, (256, 256))
    cands = [DenseSpec(precision=Precision(dtype="int4", group_size=32)), DopedSpec(density=0.5), DopedSpec(density=0.02)]
    nbytes = [c.nbytes((256, 256), 4) for c in cands]
    assert nbytes[0] < nbytes[1] and nbytes[2] < nbytes[0]
    an = SiteAnalysis(w)
    full = an.errors(cands)
    screened = an.errors(cands, nbytes=nbytes)
    assert np.isnan(screened[1]) and full[1] > 2 * full[0]
    assert screened[0] == full[0] and screened[2] == full[2]


def test_planner_trades_bits_against_structure() -> None:
    model = TOY_MODELS["llama"]()
    captured = capture(model, toy_inputs("llama"))
    sites = captured.sites
    weights = {s.name: captured.weight(s) for s in sites}
    grid = [Precision(dtype="int8"), Precision(dtype="int4", group_size=32), Precision(dtype="int2", group_size=32)]
    spaces = {s.name: [DenseChoice(precisions=["keep", *grid]), LowRankChoice()] for s in sites}
    plan = make_plan(sites, weights, spaces, "6x", progress=False)
    assert plan.ratio >= 6
    bits = {d.values for d in plan.decisions}
    assert bits <= {"keep", "int8", "int4g32", "int2g32"} and bits & {"int4g32", "int8"}
    assert "values" in plan.table() and "int4g32" in plan.table()
    # a precision no site can take is an error naming the site (no alternative allowed)
    bad = {s.name: [DenseChoice(precisions=[Precision(dtype="int4", group_size=128)])] for s in sites}
    with pytest.raises(PlanningError, match=r"site .*group_size=128"):
        make_plan(sites, weights, bad, "2x", progress=False)


@pytest.mark.slow
def test_compile_int4_kernels_policy_and_save_load_bit_exact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = TOY_MODELS["llama"]()
    small = kronc.compile(model, policy="int4-kernels", budget="5x")
    plan = small.kronc_plan
    assert {d.values for d in plan.decisions} <= {"keep", "int8", "int4g32-hqq", "int4g64-hqq", "int4g64a-hqq", "int4g128a-hqq"}
    assert plan.ratio >= 5
    x = toy_inputs("llama")
    kronc.save(small, tmp_path / "q")
    same = kronc.load(tmp_path / "q")
    before = {k: v for k, v in small.state_dict().items() if "codes" in k}
    after = same.state_dict()
    assert before and all(torch.equal(v, after[k]) and after[k].dtype in (torch.int8, torch.uint8) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(small(x).logits, same(x).logits)
    stored = sum((tmp_path / "q").glob("*.safetensors").__next__().stat().st_size for _ in [0])
    assert stored < 0.5 * sum(p.numel() * 4 for p in model.parameters())


def quant_toy_plan(captured) -> Plan:  # type: ignore[no-untyped-def]
    specs = [
        DenseSpec(precision=Precision(dtype="int4", group_size=32)),
        DenseSpec(precision=Precision(dtype="int8")),
        DenseSpec(precision=Precision(dtype="int3", group_size=32, symmetric=False)),
        LowRankSpec(rank=8, precision=Precision(dtype="int4", group_size=16)),
        KroneckerSpec(a_shape=(4, 4), terms=2, precision=Precision(dtype="bf16")),
    ]
    decisions = []
    for i, site in enumerate(s for s in captured.sites if s.kind == "linear"):
        spec = specs[i % len(specs)]
        decisions.append(Decision.of(site, spec))
    return Plan(decisions=decisions, budget="4x")


@pytest.mark.slow
def test_fullgraph_compile_and_export_of_quantized_model_match_eager() -> None:
    torch.manual_seed(0)
    model = TOY_MODELS["llama"]()
    x = toy_inputs("llama")
    captured = capture(model, x)
    small = kronc.apply(captured, quant_toy_plan(captured)).eval()
    compiled = torch.compile(small, backend="aot_eager", fullgraph=True)  # raises on any graph break
    with torch.no_grad():
        eager = small(x).logits
        torch.testing.assert_close(compiled(x).logits, eager, rtol=1e-5, atol=1e-5)
        ep = torch.export.export(small, (x,), kwargs={"use_cache": False}, strict=False)
        torch.testing.assert_close(ep.module()(x, use_cache=False).logits, eager, rtol=1e-5, atol=1e-5)
    assert any("quant_linear" in str(n.target) for n in ep.graph.nodes)


def test_quantlr_exact_structure_and_estimate_bounds_fit() -> None:
    base = Precision(dtype="int4", group_size=32)
    on_grid = Dense.fit(weight(12), DenseSpec(precision=base)).to_dense().detach()
    u, v = weight(13, (SHAPE[0], 4)), weight(14, (4, SHAPE[1]))
    spec = QuantLowRankSpec(base=base, rank=4)
    m = fit(on_grid, spec)  # on the grid: the base alone is exact, the correction is zero
    assert torch.allclose(m.to_dense(), on_grid, atol=1e-5)
    w = weight(15) + 0.5 * (u @ v)
    x = torch.randn(300, SHAPE[1], generator=torch.Generator().manual_seed(16))
    h = x.T @ x
    for moments in (None, h):
        an = SiteAnalysis(w, moments, damping=0.01)
        specs = [QuantLowRankSpec(base=base, rank=r) for r in (4, 16)]
        est = an.errors(specs)
        for s_, e in zip(specs, est, strict=True):
            fitted = kronc.planning.fit_site(w, s_, moments)
            err = (fitted.to_dense().detach() - w).double()
            real = float((err.square().sum() if moments is None else ((err @ an.h) * err).sum()) / an.total) ** 0.5
            assert real <= e * 1.02 + 1e-6, (s_.describe(), real, e)
            assert real >= 0.5 * e
        assert est[1] < est[0]
    assert fit(w, spec).nbytes() == spec.nbytes(SHAPE, 4)
