"""Planning: candidates, error estimates, the budget solver, plans, calibration."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from kronc.budget import Budget, BudgetError
from kronc.formats import (
    BlockSparseSpec,
    DenseSpec,
    DopedSpec,
    FormatSpec,
    KroneckerSpec,
    LowRankSpec,
    fit,
)
from kronc.planning import (
    Candidate,
    PlanningError,
    SearchOptions,
    SiteAnalysis,
    collect_input_moments,
    collect_sensitivity,
    divisor_pairs,
    factor_shapes,
    fit_site,
    lp_bound,
    make_plan,
    site_candidates,
    solve,
    solve_exact,
    uniform_plan,
)
from kronc.planning.estimate import top_entries
from kronc.planning.families.lowrank import lowrank_errors
from kronc.planning.solver import total_cost, total_damage
from kronc.planning.whiten import damped
from kronc.policies.choices import (
    ALL_FORMATS,
    BlockSparseChoice,
    DenseChoice,
    DopedChoice,
    KroneckerChoice,
    LowRankChoice,
)
from kronc.sites import Site


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small matrices: threads only add overhead (and stall on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SPECS: list[FormatSpec] = [
    DenseSpec(),
    LowRankSpec(rank=3),
    LowRankSpec(rank=17),
    KroneckerSpec(a_shape=(6, 8), terms=1),
    KroneckerSpec(a_shape=(6, 8), terms=3),
    KroneckerSpec(a_shape=(4, 16), terms=2),
    DopedSpec(base=None, density=0.05),
    DopedSpec(base=None, density=0.4),  # many kept entries: the dense path of the estimate
    DopedSpec(base=KroneckerSpec(a_shape=(6, 8), terms=2), density=0.02),
    DopedSpec(base=KroneckerSpec(a_shape=(12, 4), terms=1), density=0.1),
    DopedSpec(base=LowRankSpec(rank=4), density=0.03),
    BlockSparseSpec(block=(8, 8), density=0.3),
    BlockSparseSpec(block=(16, 8), density=0.6),
]


def _weight(m: int = 48, n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a decaying spectrum plus noise, like a trained weight
    u, v = torch.randn(m, 8, generator=g), torch.randn(8, n, generator=g)
    return u @ v / 4 + torch.randn(m, n, generator=g)


def _moments(n: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, n, generator=g, dtype=torch.float64) * torch.logspace(-1.5, 1, n, dtype=torch.float64)
    x[:, :4] += 3 * x[:, -4:]  # correlated channels
    return x.T @ x / x.shape[0]


def _data_error(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor | None) -> float:
    e, w = (w - approx).double(), w.double()
    hd = torch.eye(w.shape[1], dtype=torch.float64) if h is None else damped(h)
    return math.sqrt(float(((e @ hd) * e).sum() / ((w @ hd) * w).sum()))


def _site(name: str, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> Site:
    return Site(name=f"{name}.weight", kind="linear", shape=shape, dtype=dtype, owner=name, attr="weight")


# ------------------------------------------------------------------------------------ estimates


@pytest.mark.parametrize("data", [False, True], ids=["weight", "data"])
def test_estimates_equal_the_error_of_the_fit(data: bool) -> None:
    w = _weight()
    h = _moments() if data else None
    estimates = SiteAnalysis(w, h).errors(SPECS)
    for spec, est in zip(SPECS, estimates, strict=True):
        approx = (fit_site(w, spec, h) if data else fit(w, spec)).to_dense().detach()
        assert est == pytest.approx(_data_error(w, approx, h), abs=1e-5), spec.describe()


@pytest.mark.parametrize("shape", [(48, 64), (64, 48)], ids=["wide", "tall"])
def test_heldout_lowrank_estimate_is_the_cross_fitted_error(shape: tuple[int, int]) -> None:
    w = _weight(*shape)
    n = shape[1]
    halves = [_moments(n, seed=s)[:n, :n] * (1 + 0.5 * s) for s in (3, 4)]
    h = (halves[0] + halves[1]) / 2
    analysis = SiteAnalysis(w, h, folds=(halves[0].float(), halves[1].float()))
    ranks = [1, 5, 20, 40]
    est = lowrank_errors(analysis, ranks)
    total = float(((w.double() @ damped(h)) * w.double()).sum())
    for r in ranks:
        err2 = 0.0
        for a, b in ((0, 1), (1, 0)):  # fit to one half, measured on the other
            e = w.double() - fit_site(w, LowRankSpec(rank=r), halves[a].float().double()).to_dense().detach().double()
            err2 += float(((e @ damped(halves[b].float().double())) * e).sum()) / 2
        assert est[r] == pytest.approx(math.sqrt(err2 / total), rel=1e-4, abs=1e-6)
    # held out, the fit is worse than on the data it was fitted to
    in_sample = lowrank_errors(SiteAnalysis(w, h), ranks)
    assert all(est[r] > in_sample[r] for r in ranks)


def test_estimates_for_bfloat16_weights_and_refinement_near_exact() -> None:
    w = _weight().to(torch.bfloat16)
    est = SiteAnalysis(w).errors([LowRankSpec(rank=10)])[0]
    assert est == pytest.approx(_data_error(w.float(), fit(w.float(), LowRankSpec(rank=10)).to_dense().detach(), None), abs=1e-5)
    # an exactly rank-4 weight: float32 would leave ~1e-3 of rounding, the float64 redo leaves ~1e-7
    g = torch.Generator().manual_seed(3)
    low = torch.randn(40, 4, generator=g) @ torch.randn(4, 56, generator=g)
    assert SiteAnalysis(low).errors([LowRankSpec(rank=4)])[0] < 1e-6


def test_top_entries_match_a_stable_sort() -> None:
    g = torch.Generator().manual_seed(0)
    for n, k in [(1000, 10), (200_000, 10_000), (200_000, 50), (5000, 4999)]:
        for v in (torch.randn(n, generator=g).abs(), torch.randint(0, 7, (n,), generator=g).float()):  # ties too
            order = torch.argsort(v, descending=True, stable=True)[:k]
            vals, idx = top_entries(v, k)
            assert torch.equal(idx, order) and torch.equal(vals, v[order])


def test_overlay_quadratic_for_every_density() -> None:
    from kronc.planning import estimate

    g = torch.Generator().manual_seed(4)
    m, n, total = 12, 10, 60
    rest = 8 + torch.randperm(m * n - 8, generator=g)[: total - 8]
    flat = torch.cat([torch.arange(8), rest])[torch.randperm(total, generator=g)]  # a crowded first row
    rows, cols, vals = flat // n, flat % n, torch.randn(total, generator=g, dtype=torch.float64)
    h = _moments(n)
    got = estimate._overlay_quadratic(rows, cols, vals, h, [0, 1, 5, 33, 60])
    for k, q in got.items():
        s = torch.zeros(m, n, dtype=torch.float64)
        s[rows[:k], cols[:k]] = vals[:k]
        assert q == pytest.approx(float(((s @ h) * s).sum()), rel=1e-5, abs=1e-9)


# ------------------------------------------------------------------------------------ candidates


def test_dense_is_a_candidate_only_when_allowed() -> None:
    with_dense = site_candidates((48, 64), torch.float32, [DenseChoice(), LowRankChoice()])
    without = site_candidates((48, 64), torch.float32, [LowRankChoice()])
    assert any(isinstance(c.spec, DenseSpec) for c in with_dense)
    assert not any(isinstance(c.spec, DenseSpec) for c in without)


def test_candidates_save_bytes_and_respect_the_choice() -> None:
    shape, dense = (48, 64), 48 * 64 * 2
    cands = site_candidates(shape, torch.bfloat16, [*ALL_FORMATS, LowRankChoice(rank_min=3, rank_max=20, rank_multiple=8)])
    assert all(c.nbytes < dense for c in cands if not isinstance(c.spec, DenseSpec))
    assert all(c.nbytes == c.spec.nbytes(shape, 2) and c.nparams == c.spec.nparams(shape) for c in cands)
    only = site_candidates(shape, torch.bfloat16, [LowRankChoice(rank_min=3, rank_max=20, rank_multiple=8)])
    assert [c.spec.rank for c in only] == [3, 8, 16]  # type: ignore[attr-defined]
    assert max(c.spec.rank for c in cands if isinstance(c.spec, LowRankSpec)) == 24  # r * 112 < 48 * 64 up to r = 27
    assert len({c.spec for c in cands}) == len(cands)  # no duplicates
    blocks = {c.spec.block for c in cands if isinstance(c.spec, BlockSparseSpec)}
    assert blocks == {(16, 16)}  # 32x32 does not divide 48 rows
    bases = {c.spec.base for c in cands if isinstance(c.spec, DopedSpec) and c.spec.base is not None}
    assert len(bases) == SearchOptions().doped_shapes * DopedChoice().terms_max
    pruned = sorted(c.spec.density for c in cands if isinstance(c.spec, DopedSpec) and c.spec.base is None)
    assert pruned[0] == pytest.approx(0.02) and len(pruned) == 12  # ALL_FORMATS prunes at 2% to 90%


def test_candidates_raise_when_nothing_fits() -> None:
    with pytest.raises(PlanningError, match="no candidate format for a 30x30"):
        site_candidates((30, 30), torch.float32, [BlockSparseChoice(blocks=[(16, 16)])])


def test_factor_shapes_spread_and_include_the_balanced_pair() -> None:
    shape = (576, 1536)
    pairs = divisor_pairs(shape, 2)
    assert len(pairs) > 200 and all(576 % a == 0 and 1536 % b == 0 for a, b in pairs)
    chosen = factor_shapes(shape, 2, 8)
    assert len(chosen) == 8 and set(chosen) <= set(pairs)
    sizes = sorted(a * b for a, b in chosen)
    assert sizes[0] <= 8 and sizes[-1] >= 576 * 1536 // 8  # from lopsided to lopsided
    assert any(abs(math.log(a * b / (576 * 1536 / (a * b)))) < 0.5 for a, b in chosen)  # ~balanced
    assert factor_shapes((12, 8), 2, 8) == sorted(p for p in divisor_pairs((12, 8), 2))


# ------------------------------------------------------------------------------------ solver


def _table(rng: random.Random, k: int) -> list[Candidate]:
    return [
        Candidate(spec=DenseSpec(), nbytes=(c := rng.randint(1, 60)), nparams=c // 2 + 1, damage=rng.random() * 10)
        for _ in range(k)
    ]


def _realistic_tables() -> list[list[Candidate]]:
    tables = []
    for i, shape in enumerate([(48, 64), (64, 64), (32, 64), (64, 32)]):
        w = _weight(*shape, seed=i)
        cands = site_candidates(shape, torch.float32, list(ALL_FORMATS))
        an = SiteAnalysis(w)
        errs = an.errors([c.spec for c in cands])
        tables.append([Candidate(c.spec, c.nbytes, c.nparams, c.choice, e, e**2 * an.total) for c, e in zip(cands, errs, strict=True)])
    return tables


def test_solver_matches_brute_force_on_small_cases() -> None:
    """Exact on every case here; in general within the gain of one hull segment (checked too)."""
    rng = random.Random(0)
    for _ in range(150):
        tables = [_table(rng, rng.randint(1, 5)) for _ in range(rng.randint(1, 5))]
        key = rng.choice(["bytes", "params"])
        lo = sum(min(c.cost(key) for c in t) for t in tables)
        hi = sum(max(c.cost(key) for c in t) for t in tables)
        limit = rng.uniform(lo, hi)
        picks, exact = solve(tables, limit, key), solve_exact(tables, limit, key)
        brute = min(
            (total_damage(tables, p) for p in itertools.product(*(range(len(t)) for t in tables))
             if total_cost(tables, p, key) <= limit),
        )
        assert total_damage(tables, exact) == pytest.approx(brute, abs=1e-12)
        assert total_cost(tables, picks, key) <= limit
        assert lp_bound(tables, limit, key) <= brute + 1e-9
        assert total_damage(tables, picks) == pytest.approx(brute, abs=1e-9)


def test_solver_is_deterministic_monotone_and_within_budget() -> None:
    tables = _realistic_tables()
    lo = sum(min(c.nbytes for c in t) for t in tables)
    hi = sum(max(c.nbytes for c in t) for t in tables)
    previous = math.inf
    for limit in [lo + (hi - lo) * i / 60 for i in range(61)]:
        picks = solve(tables, limit)
        assert picks == solve(tables, limit)
        assert total_cost(tables, picks) <= limit
        damage = total_damage(tables, picks)
        assert damage <= previous * (1 + 1e-12)
        assert lp_bound(tables, limit) <= damage * (1 + 1e-12)
        previous = damage


def test_solver_monotone_on_every_integer_budget() -> None:
    rng = random.Random(7)
    for _ in range(20):
        tables = [_table(rng, rng.randint(2, 6)) for _ in range(rng.randint(2, 6))]
        lo = sum(min(c.nbytes for c in t) for t in tables)
        hi = sum(max(c.nbytes for c in t) for t in tables)
        damages = [total_damage(tables, solve(tables, b, grid=4)) for b in range(lo, hi + 1)]
        assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(damages))


def test_solver_says_how_small_it_can_get() -> None:
    tables = [[Candidate(DenseSpec(), 100, 50, damage=0.0), Candidate(DenseSpec(), 40, 20, damage=1.0)],
              [Candidate(DenseSpec(), 30, 15, damage=2.0)]]
    with pytest.raises(BudgetError, match="smallest reachable total is 70 bytes"):
        solve(tables, 69)
    with pytest.raises(BudgetError, match="smallest reachable total is 35 parameters"):
        solve(tables, 34, "params")
    assert solve(tables, 70) == [1, 0] and solve(tables, 130) == [0, 0]


# ------------------------------------------------------------------------------------ plans


def _model_sites() -> tuple[list[Site], dict[str, torch.Tensor]]:
    sites = [_site("a", (48, 64)), _site("b", (64, 64)), _site("c", (32, 64)), _site("out", (64, 32))]
    weights = {s.name: _weight(*s.shape, seed=i) for i, s in enumerate(sites)}
    return sites, weights


@pytest.mark.slow
def test_plan_meets_budget_deterministic_and_monotone() -> None:
    sites, weights = _model_sites()
    spaces = {s.name: list(ALL_FORMATS) for s in sites[:3]}  # "out" is out of scope
    rules = {s.name: "default" for s in sites[:3]}
    in_scope = sum(s.nbytes for s in sites[:3])
    previous = 0.0
    for ratio in (2, 4, 8, 16):
        plan = make_plan(sites, weights, spaces, f"{ratio}x", rules=rules, progress=False)
        assert plan.sites == [s.name for s in sites[:3]]
        assert plan.bytes_before == in_scope and plan.bytes_after <= in_scope / ratio
        assert all(d.rule == "default" and d.error is not None for d in plan.decisions)
        again = make_plan(sites, weights, spaces, f"{ratio}x", rules=rules, progress=False)
        assert again.model_dump() == plan.model_dump()
        damage = sum(d.error**2 * float(weights[d.site].square().sum()) for d in plan.decisions)  # type: ignore[operator]
        assert damage >= previous * (1 - 1e-9)  # tighter budget, no less damage
        previous = damage
    plan = make_plan(sites, weights, spaces, "3000 params", progress=False)
    assert sum(d.params_after for d in plan.decisions) <= 3000


def test_plan_budget_error_names_the_smallest_reachable_size() -> None:
    sites, weights = _model_sites()
    spaces = {s.name: [LowRankChoice(rank_min=8)] for s in sites}
    with pytest.raises(BudgetError, match=r"smallest plan the allowed formats reach is 13,824 bytes \(3\.3x\)"):
        make_plan(sites, weights, spaces, "100x", progress=False)


def test_search_finds_an_exact_kronecker_product() -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.kron(torch.randn(4, 4, generator=g), torch.randn(12, 16, generator=g))  # 48x64
    site = _site("k", (48, 64))
    for choice in (KroneckerChoice(), KroneckerChoice(a_shapes=[(4, 4), (8, 8)], terms_max=2)):
        plan = make_plan([site], {site.name: w}, {site.name: [choice, LowRankChoice(), DenseChoice()]}, "10x", progress=False)
        d = plan.decisions[0]
        assert isinstance(d.spec, KroneckerSpec) and d.spec.a_shape == (4, 4) and d.spec.terms == 1
        assert d.error is not None and d.error < 1e-6
        assert _data_error(w, fit(w, d.spec).to_dense().detach(), None) < 1e-6


def test_data_aware_lowrank_beats_plain_svd_on_anisotropic_inputs() -> None:
    w = _weight(48, 64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 64, generator=g) * torch.logspace(-2, 1, 64)
    h = (x.T.double() @ x.double()) / x.shape[0]
    site = _site("lr", (48, 64))
    plans = {
        kind: make_plan([site], {site.name: w}, {site.name: [LowRankChoice(rank_multiple=1)]}, "4x", moments=m, progress=False)
        for kind, m in (("weight", None), ("data", {site.name: h}))
    }
    assert plans["data"].objective == "data" and plans["weight"].objective == "weight"
    spec = plans["data"].decisions[0].spec
    plain = fit(w, spec).to_dense().detach()
    aware = fit_site(w, spec, h).to_dense().detach()
    out_err = lambda a: float((x @ (w - a).T).norm() / (x @ w.T).norm())  # noqa: E731
    assert out_err(aware) < 0.8 * out_err(plain)
    assert plans["data"].decisions[0].error == pytest.approx(_data_error(w, aware, h), abs=1e-6)


@pytest.mark.parametrize(
    "spec", [DopedSpec(density=0.3), BlockSparseSpec(block=(4, 4), density=0.3)], ids=["pruning", "blocks"]
)
def test_data_aware_sparse_ranking_beats_magnitude_on_anisotropic_inputs(spec) -> None:  # type: ignore[no-untyped-def]
    w = _weight(48, 64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4000, 64, generator=g) * torch.logspace(-2, 1, 64)
    h = (x.T.double() @ x.double()) / x.shape[0]
    plain = fit(w, spec).to_dense().detach()
    aware = fit_site(w, spec, h).to_dense().detach()
    out_err = lambda a: float((x @ (w - a).T).norm() / (x @ w.T).norm())  # noqa: E731
    assert out_err(aware) < 0.8 * out_err(plain)
    assert int((aware != 0).sum()) == int((plain != 0).sum())  # same storage, other entries


@pytest.mark.parametrize("fmt", ["lowrank", "kronecker", "doped", "blocksparse"])
def test_uniform_plan_keeps_every_site_within_the_ratio(fmt: str) -> None:
    sites, weights = _model_sites()
    plan = uniform_plan(sites, weights, fmt, "4x")
    for d, s in zip(plan.decisions, sites, strict=True):
        assert d.spec.kind == fmt and d.bytes_after <= s.nbytes / 4 and d.bytes_after > s.nbytes / 8
        assert d.error == pytest.approx(_data_error(weights[s.name], fit(weights[s.name], d.spec).to_dense().detach(), None), abs=1e-5)
    if fmt == "doped":
        assert all(isinstance(d.spec, DopedSpec) and d.spec.base is None for d in plan.decisions)


def test_importance_scales_damage_and_missing_sites_get_the_median() -> None:
    sites, weights = _model_sites()
    spaces = {s.name: [LowRankChoice(), DenseChoice()] for s in sites}
    base = make_plan(sites, weights, spaces, "3x", progress=False)
    same = make_plan(sites, weights, spaces, "3x", progress=False, importance={s.name: 7.0 for s in sites})
    assert same.model_dump() == base.model_dump()  # a common factor changes nothing
    # one site made very important stays dense (or nearly); the median fills in for the others
    vip = sites[0].name
    weighted = make_plan(sites, weights, spaces, "3x", progress=False, importance={vip: 1e6, sites[1].name: 1.0, sites[2].name: 1.0})
    assert weighted[vip].bytes_after >= base[vip].bytes_after
    assert weighted[vip].bytes_after == max(d.bytes_after for d in weighted.decisions if d.site == vip)
    assert weighted[vip].spec.kind == "dense"


def test_workers_give_the_same_plan() -> None:
    sites, weights = _model_sites()
    spaces = {s.name: list(ALL_FORMATS) for s in sites}
    threads = torch.get_num_threads()
    one = make_plan(sites, weights, spaces, Budget.parse("6x"), progress=False, options=SearchOptions(workers=1))
    two = make_plan(sites, weights, spaces, "6x", progress=False, options=SearchOptions(workers=3))
    assert one.model_dump() == two.model_dump()
    assert torch.get_num_threads() == threads  # restored


# ------------------------------------------------------------------------------------ calibration


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 6)
        self.k = nn.Linear(8, 4)
        self.emb = nn.Embedding(10, 8)
        self.rnn = nn.LSTM(8, 5, num_layers=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.q(x) + self.k(x).sum(-1, keepdim=True)
        out, _ = self.rnn(x)
        return y.sum() + out.sum()


def test_collect_input_moments() -> None:
    torch.manual_seed(0)
    model = _Block()
    sites = [
        _site("q", (6, 8)), _site("k", (4, 8)),
        Site(name="emb.weight", kind="embedding", shape=(10, 8), dtype=torch.float32, owner="emb", attr="weight"),
        *[Site(name=f"rnn.weight_{t}_l{k}", kind="lstm", shape=(20, 8 if (t, k) == ("ih", 0) else 5),
               dtype=torch.float32, owner="rnn", attr=f"weight_{t}_l{k}") for t in ("ih", "hh") for k in (0, 1)],
    ]
    batches = [torch.randn(7, 3, 8) for _ in range(3)]  # (time, batch, features)
    moments = collect_input_moments(model, sites, batches, progress=False)
    assert "emb.weight" not in moments
    x = torch.cat([b.reshape(-1, 8) for b in batches]).double()
    ref = x.T @ x / x.shape[0]
    for name in ("q.weight", "k.weight", "rnn.weight_ih_l0"):
        torch.testing.assert_close(moments[name], ref)
    # sites reading the same input share one tensor (downstream work per Gram matrix is shared by identity)
    assert moments["k.weight"] is moments["q.weight"] and moments.folds["k.weight"] is moments.folds["q.weight"]
    assert moments["rnn.weight_ih_l1"] is not moments["rnn.weight_hh_l1"]  # same width, other inputs
    # layer 1 of the LSTM: its input is layer 0's output; its recurrent input is [h0, h_1..h_{T-1}]
    layer0 = nn.LSTM(8, 5)
    layer0.load_state_dict({"weight_ih_l0": model.rnn.weight_ih_l0, "weight_hh_l0": model.rnn.weight_hh_l0,
                            "bias_ih_l0": model.rnn.bias_ih_l0, "bias_hh_l0": model.rnn.bias_hh_l0})
    with torch.no_grad():
        mid = [layer0(b)[0] for b in batches]
        top = [model.rnn(b)[0] for b in batches]
    m = torch.cat([o.reshape(-1, 5) for o in mid]).double()
    torch.testing.assert_close(moments["rnn.weight_ih_l1"], m.T @ m / m.shape[0])
    hh = torch.cat([torch.cat([torch.zeros(1, 3, 5), o[:-1]]).reshape(-1, 5) for o in top]).double()
    torch.testing.assert_close(moments["rnn.weight_hh_l1"], hh.T @ hh / hh.shape[0])
    assert model.training  # mode restored


def test_collect_input_moments_folds_are_the_even_and_odd_batches() -> None:
    torch.manual_seed(0)
    model = _Block()
    sites = [_site("q", (6, 8))]
    batches = [torch.randn(5, 2, 8) for _ in range(4)]
    moments = collect_input_moments(model, sites, batches, progress=False)
    even, odd = moments.folds["q.weight"]
    for half, chosen in ((even, batches[0::2]), (odd, batches[1::2])):
        x = torch.cat([b.reshape(-1, 8) for b in chosen]).double()
        torch.testing.assert_close(half.double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    assert not collect_input_moments(model, sites, batches[:1], progress=False).folds  # one batch: no halves


class _Classifier(nn.Module):
    def __init__(self, logits: bool) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.head = nn.Linear(16, 5)
        self.logits = logits

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        out = self.head(torch.tanh(self.hidden(x)))
        return type("Out", (), {"logits": out})() if self.logits else out


def test_collect_sensitivity_is_the_fisher_per_output_feature() -> None:
    torch.manual_seed(0)
    model = _Classifier(logits=True)
    sites = [_site("hidden", (16, 8)), _site("head", (5, 16))]
    batches = [torch.randn(2000, 8) for _ in range(3)]
    flags = [p.requires_grad for p in model.parameters()]
    kappa = collect_sensitivity(model, sites, batches, max_batches=2, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
    # at the logits, g = softmax - onehot(y) with y ~ softmax: E||g||^2 = 1 - ||p||^2
    with torch.no_grad():
        p = torch.softmax(model.head(torch.tanh(model.hidden(torch.cat(batches[:2])))), -1)
    assert kappa["head.weight"] == pytest.approx(float((1 - p.square().sum(-1)).mean()) / 5, rel=0.05)
    assert kappa["hidden.weight"] > 0
    assert kappa == collect_sensitivity(model, sites, batches, max_batches=2, progress=False)  # seeded
    # no logits: a standard normal projection of the output, E||g||^2 = out features at the output
    plain = collect_sensitivity(_Classifier(logits=False), sites, batches, max_batches=3, progress=False)
    assert plain["head.weight"] == pytest.approx(1.0, rel=0.05)


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.head = nn.Linear(8, 11)

    def forward(self, ids: torch.Tensor):  # type: ignore[no-untyped-def]
        return type("Out", (), {"logits": self.head(self.emb(ids))})()


def test_collect_sensitivity_of_a_causal_lm_is_the_next_token_gradient() -> None:
    torch.manual_seed(0)
    model = _TinyLM()
    batches = [torch.randint(0, 11, (3, 9)) for _ in range(2)]
    kappa = collect_sensitivity(model, [_site("head", (11, 8))], batches, progress=False)
    total = 0.0
    with torch.no_grad():
        for ids in batches:
            p = torch.softmax(model.head(model.emb(ids)), -1)[:, :-1]
            total += float((p - nn.functional.one_hot(ids[:, 1:], 11)).square().sum())
    assert kappa["head.weight"] == pytest.approx(total / (2 * 3 * 9 * 11), rel=1e-5)
