"""Tests of the training schemes in `kronc.recover.schemes`, driven by a small hand-written loop.

`train` calls the hooks in the order `kronc.recover` documents (`base.py`): ``before_step``,
forward + ``penalty``, ``backward``, ``after_backward``, optimizer step, ``after_step``; so these
tests do not depend on the recovery loop itself. Shapes are tiny; every check could fail.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import kronc
from kronc.formats import (
    BlockSparse,
    BlockSparseSpec,
    Doped,
    DopedSpec,
    Kronecker,
    KroneckerSpec,
    LowRank,
    LowRankSpec,
    SparseIndex,
    SparseOverlay,
)
from kronc.formats.sparse_index import count_kept
from kronc.modules import CompressedLinear
from kronc.plan import Decision, Plan
from kronc.recover.schemes import (
    BlockMask,
    CoMatrixDropout,
    MovementPruning,
    MovementScores,
    OverlayAnnealing,
    ReweightedGroupLasso,
    Scheme,
    block_norms,
    cubic_density,
    denser_plan,
    energy_rank,
    lpaf_factorize,
    masked_error,
    mixed_ranks,
    movement_prune,
    prune_blocks,
    sparsity_aware_svd,
)
from kronc.tools.toy import FunctionalMLP

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These shapes are tiny: one intra-op thread is fastest, and immune to a busy 2-core machine
    (where idle OpenMP workers spin-wait, a 30 µs matmul can take 60 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def train(
    model: nn.Module,
    schemes: list[Scheme],
    opt: torch.optim.Optimizer,
    loss_fn: Callable[[], Tensor],
    start: int,
    stop: int,
    log: list[dict[str, float]] | None = None,
) -> None:
    """Steps ``start..stop-1`` of the documented hook order (schemes already attached)."""
    for step in range(start, stop):
        for s in schemes:
            s.before_step(step)
        loss = loss_fn()
        for s in schemes:
            p = s.penalty(step)
            if p is not None:
                loss = loss + p
        opt.zero_grad()
        loss.backward()
        for s in schemes:
            s.after_backward(step)
        opt.step()
        for s in schemes:
            s.after_step(step)
        if log is not None:
            log.append({k: v for s in schemes for k, v in s.metrics().items()})


def doped_layer(out: int, inp: int, a_shape: tuple[int, int], density: float, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> CompressedLinear:
    w = torch.randn(out, inp, generator=gen(seed), dtype=F64).to(dtype)
    return CompressedLinear(Doped.fit(w, DopedSpec(base=KroneckerSpec(a_shape=a_shape), density=density)))


def doped_decision(site: str, shape: tuple[int, int], a_shape: tuple[int, int], density: float) -> Decision:
    spec = DopedSpec(base=KroneckerSpec(a_shape=a_shape), density=density)
    return Decision(site=site, shape=shape, spec=spec, bytes_before=shape[0] * shape[1] * 4,
                    bytes_after=spec.nbytes(shape, 4), params_after=spec.nparams(shape))


# =========================================================================== overlay annealing


def test_annealing_reaches_the_target_exactly_repacks_and_round_trips(tmp_path: Path) -> None:
    """Graph-mode FunctionalMLP (a call_module site and an F.linear site), compiled 4x denser than
    the plan, annealed back to the plan's densities, repacked, saved and loaded."""
    torch.manual_seed(0)
    teacher = FunctionalMLP()
    plan = Plan(decisions=[doped_decision("fc1.weight", (64, 32), (8, 4), 0.05),
                           doped_decision("w2", (16, 64), (4, 8), 0.04)])
    dense_start = denser_plan(plan, 4)
    assert [d.spec.density for d in dense_start.decisions] == [0.2, 0.16]
    student = kronc.apply(teacher, dense_start, output="graph")
    fmts = [m for m in student.modules() if isinstance(m, Doped)]
    assert sorted(f.overlay.index.nnz for f in fmts) == sorted([count_kept(0.2, 64 * 32), count_kept(0.16, 16 * 64)])

    steps = 12
    scheme = OverlayAnnealing(target_density=plan, schedule="cosine", end_fraction=0.75)
    scheme.attach(student, steps)
    x = torch.randn(32, 32, generator=gen(1))
    with torch.no_grad():
        y = teacher(x)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    log: list[dict[str, float]] = []
    train(student, [scheme], opt, lambda: (student(x) - y).square().mean(), 0, steps, log)
    kept = [m["overlay_kept"] for m in log]
    assert all(b <= a for a, b in zip(kept, kept[1:], strict=False)), "the count only goes down"
    targets = count_kept(0.05, 64 * 32) + count_kept(0.04, 16 * 64)
    assert kept[0] > kept[5] > targets and kept[9] == targets == kept[-1], kept  # target from step 9 = 0.75 * 12
    for f in fmts:  # masked entries are exactly zero before finish
        assert int((f.overlay.values != 0).sum()) <= count_kept(f.spec.density / 4, f.shape[0] * f.shape[1])

    with torch.no_grad():
        before = student(x)
    scheme.finish(student)
    for f in fmts:
        want = {(64, 32): 0.05, (16, 64): 0.04}[f.shape]
        assert f.spec.density == want
        assert f.overlay.index.nnz == count_kept(want, f.shape[0] * f.shape[1])
        assert f.nbytes() == f.spec.nbytes(f.shape, 4)
        assert f.overlay.values.requires_grad
    with torch.no_grad():
        assert torch.allclose(student(x), before, atol=1e-6), "repacking drops only zeros"
    assert [d.spec for d in student.kronc_plan.decisions] == [d.spec for d in plan.decisions]
    assert student.kronc_plan.bytes_after == plan.bytes_after

    kronc.save(student, tmp_path)
    loaded = kronc.load(tmp_path, model=FunctionalMLP)
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))


def test_annealing_with_one_density_and_linear_schedule_prunes_the_smallest() -> None:
    layer = doped_layer(16, 16, (4, 4), 0.25)
    model = nn.Sequential(layer)
    fmt = layer.weight_format
    scheme = OverlayAnnealing(0.1, start_density=0.2, schedule="linear", end_fraction=0.5)
    scheme.attach(model, 10)
    total = 256
    assert [scheme.count(scheme.overlays[0], s) for s in (0, 5, 9)] == [count_kept(0.2, total), 26, 26]
    values = fmt.overlay.values.detach().clone()
    scheme.before_step(0)  # prunes the fitted 64 entries to the start count (51) by magnitude
    kept = fmt.overlay.values.detach() != 0
    assert int(kept.sum()) == count_kept(0.2, total)
    assert values.abs()[kept].min() >= values.abs()[~kept].max()
    scheme.finish(model)
    assert fmt.overlay.index.nnz == count_kept(0.1, total) and fmt.spec.density == 0.1
    assert fmt.nbytes() == fmt.spec.nbytes(fmt.shape, 4)
    assert fmt.overlay.index.encoding == "bitmap"


def test_annealing_masks_gradients_and_resists_momentum() -> None:
    layer = doped_layer(8, 8, (2, 2), 0.5, seed=3)
    model = nn.Sequential(layer)
    values = layer.weight_format.overlay.values
    scheme = OverlayAnnealing(0.25, end_fraction=0.5)
    scheme.attach(model, 4)
    x, y = torch.randn(16, 8, generator=gen(0)), torch.randn(16, 8, generator=gen(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, [scheme], opt, lambda: (model(x) - y).square().mean(), 0, 2)
    scheme.before_step(2)
    (model(x) - y).square().mean().backward()
    scheme.after_backward(2)
    mask = scheme.overlays[0].mask
    assert int(mask.sum()) == count_kept(0.25, 64) and bool((values.grad[~mask] == 0).all())
    opt.step()  # momentum from earlier steps would move masked entries
    scheme.after_step(2)
    assert bool((values.detach()[~mask] == 0).all())


# =========================================================================== co-matrix dropout


def kron_target_layer(dtype: torch.dtype = F64) -> tuple[CompressedLinear, Tensor]:
    """A doped 16x16 layer whose base is A⊗B and whose overlay covers block (0, 0) (zero at first),
    and a target A'⊗B differing from it only in that block: both parts can fit it exactly."""
    g = gen(0)
    a, b = torch.randn(1, 4, 4, generator=g, dtype=dtype), torch.randn(1, 4, 4, generator=g, dtype=dtype)
    kspec = KroneckerSpec(a_shape=(4, 4))
    cover = torch.zeros(16, 16, dtype=torch.bool)
    cover[:4, :4] = True
    overlay = SparseOverlay(SparseIndex.from_mask(cover), torch.zeros(16, dtype=dtype))
    doped = Doped(Kronecker(a.clone(), b.clone(), kspec), overlay, DopedSpec(base=kspec, density=16 / 256))
    da = torch.zeros(4, 4, dtype=dtype)
    da[0, 0] = 1.0
    return CompressedLinear(doped), torch.kron(a[0] + da, b[0])


def overlay_share(p: float, steps: int = 40) -> float:
    """``||ΔS|| / ||Δ(A⊗B)||`` after fitting the target of `kron_target_layer` with CMR at ``p``."""
    layer, target = kron_target_layer()
    doped = layer.weight_format
    k0 = doped.base.to_dense().detach().clone()
    x = torch.randn(128, 16, generator=gen(2), dtype=F64)
    y = x @ target.T
    scheme = CoMatrixDropout(p=p, seed=1, enabled=p > 0)
    scheme.attach(layer, steps)
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    train(layer, [scheme], opt, lambda: (layer(x) - y).square().mean(), 0, steps)
    scheme.finish(layer)
    return float(doped.overlay.values.detach().norm() / (doped.base.to_dense().detach() - k0).norm())


def test_cmr_shifts_the_learned_update_from_the_overlay_to_the_base() -> None:
    off, on = overlay_share(0.0), overlay_share(0.5)
    assert on < 0.5 * off, (on, off)  # measured: 0.06 vs 0.41


def test_cmr_eval_is_deterministic_and_training_is_not() -> None:
    layer = doped_layer(16, 16, (4, 4), 0.2, seed=5)
    layer.bias = nn.Parameter(torch.randn(16, generator=gen(6)))
    x = torch.randn(8, 16, generator=gen(7))
    with torch.no_grad():
        reference = layer(x)
    scheme = CoMatrixDropout(p=0.5)
    scheme.attach(layer, 1)
    layer.train()
    with torch.no_grad():
        a, b = layer(x), layer(x)
        assert not torch.equal(a, b), "dropout draws a fresh mask per call"
        base = layer.weight_format.base(x, layer.bias)
        # every output is either the base alone (dropped) or base + 2 * overlay (kept, rescaled)
        overlay = layer.weight_format.overlay(x)
        dropped, kept = torch.isclose(a, base, atol=1e-5), torch.isclose(a, base + 2 * overlay, atol=1e-5)
        assert bool((dropped | kept).all()) and 0.25 < float(dropped.float().mean()) < 0.75
        layer.eval()
        assert torch.equal(layer(x), reference) and torch.equal(layer(x), reference)
    scheme.finish(layer)
    assert "forward" not in vars(layer.weight_format)
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), reference), "finish restores the original forward"


def test_cmr_base_target_drops_the_base_instead() -> None:
    layer = doped_layer(8, 8, (2, 2), 0.25, seed=2)
    x = torch.randn(4, 8, generator=gen(3))
    scheme = CoMatrixDropout(p=0.5, target="base")
    scheme.attach(layer, 1)
    with torch.no_grad():
        y = layer.train()(x)
        base, overlay = layer.weight_format.base(x), layer.weight_format.overlay(x)
        assert bool((torch.isclose(y, overlay, atol=1e-5) | torch.isclose(y, overlay + 2 * base, atol=1e-5)).all())
    scheme.finish(layer)


# =========================================================================== group lasso, block pruning


def block_regression(seed: int = 0) -> tuple[nn.Linear, Tensor, Tensor, Tensor, Tensor]:
    """16x32 weight in (4, 8) blocks, 6 of 16 relevant; noisy targets; a random start."""
    g = gen(seed)
    relevant = torch.zeros(16, dtype=torch.bool)
    relevant[torch.randperm(16, generator=g)[:6]] = True
    relevant = relevant.reshape(4, 4)
    true_w = torch.randn(16, 32, generator=g) * relevant.repeat_interleave(4, 0).repeat_interleave(8, 1)
    x = torch.randn(96, 32, generator=g)
    y = x @ true_w.T + 0.5 * torch.randn(96, 16, generator=g)
    lin = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(0.3 * torch.randn(16, 32, generator=g))
    return lin, x, y, true_w, relevant


def fit_blocks(strength: float, steps: int = 100) -> tuple[nn.Sequential, ReweightedGroupLasso, Tensor, Tensor, Tensor, Tensor]:
    lin, x, y, true_w, relevant = block_regression()
    model = nn.Sequential(lin)
    start = block_norms(lin.weight.detach(), (4, 8))
    scheme = ReweightedGroupLasso((4, 8), strength=strength, refresh_every=25, eps=1e-3)
    scheme.attach(model, steps)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    train(model, [scheme], opt, lambda: (model(x) - y).square().mean(), 0, steps)
    return model, scheme, start, block_norms(true_w, (4, 8)), relevant, x


def test_group_lasso_drives_irrelevant_blocks_to_zero_then_prune_and_mask() -> None:
    plain, _, start, _, relevant, _ = fit_blocks(0.0)
    plain_weak = (block_norms(plain[0].weight.detach(), (4, 8)) / start)[~relevant].max()
    model, scheme, start, true_norms, relevant, x = fit_blocks(0.3)
    norms = block_norms(model[0].weight.detach(), (4, 8))
    weak = (norms / start)[~relevant].max()
    assert weak < 0.03 and weak < plain_weak / 10, (float(weak), float(plain_weak))
    assert bool(((norms / true_norms)[relevant] > 0.5).all()), "the relevant blocks stay"
    assert scheme.metrics()["group_lasso"] > 0

    mask = prune_blocks(model, 6 / 16, (4, 8))  # exactly 6 of 16 blocks
    assert mask.kept() == {"0": 6} and torch.equal(mask.masks["0"], relevant)
    weight = model[0].weight
    assert bool((block_norms(weight.detach(), (4, 8))[~relevant] == 0).all())

    # masked fine-tuning: pruned blocks stay exactly zero (Adam with momentum would move them)
    mask.attach(model, 5)
    y2 = torch.randn(96, 16, generator=gen(9))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    train(model, [mask], opt, lambda: (model(x) - y2).square().mean(), 0, 5)
    assert bool((block_norms(weight.detach(), (4, 8))[~relevant] == 0).all())
    assert bool((block_norms(weight.detach(), (4, 8))[relevant] > 0).all())

    # the bridge: blocksparse fits the pruned weight exactly, and to_blocksparse swaps it in
    spec = BlockSparseSpec(block=(4, 8), density=6 / 16)
    fitted = BlockSparse.fit(weight.detach(), spec)
    assert torch.equal(fitted.to_dense(), weight.detach())
    with torch.no_grad():
        before = model(x)
    fmts = mask.to_blocksparse(model)
    assert isinstance(model[0], CompressedLinear) and model[0].weight_format is fmts["0"]
    assert torch.equal(fmts["0"].to_dense(), fitted.to_dense())
    assert fmts["0"].nbytes() == spec.nbytes((16, 32), 4) == model.kronc_plan["0.weight"].bytes_after
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D layout (``weight`` stored ``(in, out)``), without importing transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


def test_group_lasso_on_conv1d_and_ratio_budget() -> None:
    conv = Conv1D(16, 32)  # weight stored (in=32, out=16)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(32, 16, generator=gen(0)))
    model = nn.Sequential(conv)
    scheme = ReweightedGroupLasso((4, 8), strength=0.1)
    scheme.attach(model, 1)
    norms = scheme.group_norms()["0"]
    assert norms.shape == (4, 4) and torch.allclose(norms, block_norms(conv.weight.detach().T, (4, 8)))
    pen = scheme.penalty(0)
    assert pen is not None and torch.isclose(pen, torch.tensor(0.1 * float((norms / (norms + 1e-3)).sum())))
    mask = prune_blocks(model, "4x", (4, 8))  # 2048 bytes / 4 = 512: 3 blocks of 128 + 2-byte bitmap
    assert mask.kept() == {"0": 3}
    fmt = mask.to_blocksparse(model)["0"]
    assert fmt.nbytes() <= 16 * 32 * 4 / 4
    x = torch.randn(3, 32, generator=gen(1))
    expected = x @ (conv.weight.detach().T * (mask.masks["0"].repeat_interleave(4, 0).repeat_interleave(8, 1))).T
    with torch.no_grad():
        assert torch.allclose(model(x), expected + conv.bias, atol=1e-5)


def test_group_lasso_state_round_trip_and_refresh() -> None:
    lin, x, y, _, _ = block_regression()
    model = nn.Sequential(lin)
    scheme = ReweightedGroupLasso((4, 8), strength=0.3, refresh_every=2)
    scheme.attach(model, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train(model, [scheme], opt, lambda: (model(x) - y).square().mean(), 0, 3)
    state = scheme.state_dict()
    expected = 1 / (block_norms(lin.weight.detach().double(), (4, 8)) + 1e-3)
    assert not torch.allclose(state["reweights"][0], expected), "step 2 refreshed, step 2's update came after"
    fresh = ReweightedGroupLasso((4, 8), strength=0.3, refresh_every=2)
    fresh.load_state_dict(state)  # before attach: applied at attach
    fresh.attach(model, 4)
    assert torch.equal(fresh.reweights[0], state["reweights"][0])
    fresh.before_step(4)
    assert torch.allclose(fresh.reweights[0], expected)
    pruner = ReweightedGroupLasso((4, 8), prune_density=0.5)
    pruner.attach(model, 1)
    pruner.finish(model)
    assert pruner.block_mask is not None and pruner.block_mask.kept() == {"0": 8}
    assert int((block_norms(lin.weight.detach(), (4, 8)) > 0).sum()) == 8


# =========================================================================== movement pruning


def test_movement_scores_accumulate_minus_w_times_grad() -> None:
    lin = nn.Linear(6, 4)
    model = nn.Sequential(lin)
    scheme = MovementScores()
    scheme.attach(model, 3)
    x, y = torch.randn(10, 6, generator=gen(0)), torch.randn(10, 4, generator=gen(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = torch.zeros(4, 6)
    for step in range(3):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        expected -= lin.weight.detach() * lin.weight.grad
        scheme.after_backward(step)
        opt.step()
    assert torch.allclose(scheme.scores["0"], expected)


def test_movement_keeps_weights_moving_away_from_zero_where_magnitude_would_not() -> None:
    """Half the weights start large with target 0 (shrinking), half start small with target 1
    (growing). After a few steps the shrinking ones are still larger, but movement keeps the growing."""
    growing = torch.rand(8, 8, generator=gen(0)) < 0.5
    target = growing.float()
    lin = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.where(growing, 0.1, 1.0))
    model = nn.Sequential(lin)
    x = torch.randn(64, 8, generator=gen(1))
    y = x @ target.T
    scheme = MovementScores()
    scheme.attach(model, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train(model, [scheme], opt, lambda: (model(x) - y).square().mean(), 0, 5)
    keep = int(growing.sum())
    density = keep / 64
    magnitude = movement_prune(copy.deepcopy(model), density)["0"]
    assert int((magnitude & growing).sum()) < keep // 2, "magnitude still prefers the shrinking weights"
    masks = movement_prune(model, density, scheme)
    assert torch.equal(masks["0"], growing)
    assert bool((lin.weight.detach()[~growing] == 0).all())


def test_movement_prune_global_scope_and_checks() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with torch.no_grad():
        model[1].weight.mul_(100)  # the second layer dominates a global magnitude ranking
    masks = movement_prune(model, 0.25, scope="global")
    assert int(masks["0"].sum()) + int(masks["1"].sum()) == count_kept(0.25, 96)
    assert int(masks["1"].sum()) == 24 and int(masks["0"].sum()) == 0
    with pytest.raises(ValueError, match="movement_prune: density must be in \\(0, 1\\], got 0"):
        movement_prune(model, 0)
    with pytest.raises(ValueError, match="scores name nope"):
        movement_prune(model, 0.5, {"nope": torch.zeros(2, 2)})


def movement_run(stop: int, resume_at: int | None = None) -> tuple[nn.Module, MovementPruning, list[float]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8))
    x, y = torch.randn(32, 12, generator=gen(0)), torch.randn(32, 8, generator=gen(1))
    total = 20

    def loss() -> Tensor:
        return (model(x) - y).square().mean()

    scheme = MovementPruning(0.25, warmup_fraction=0.1, end_fraction=0.6, update_every=2)
    scheme.attach(model, total)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    log: list[dict[str, float]] = []
    if resume_at is None:
        train(model, [scheme], opt, loss, 0, stop, log)
        return model, scheme, [m["weight_density"] for m in log]
    train(model, [scheme], opt, loss, 0, resume_at, log)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), scheme.state_dict()))
    # a fresh process: new model, optimizer and scheme, restored from the checkpoint
    model2 = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8))
    model2.load_state_dict(saved[0])
    model = model2  # the loss closure reads `model`
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(saved[1])
    scheme2 = MovementPruning(0.25, warmup_fraction=0.1, end_fraction=0.6, update_every=2)
    scheme2.attach(model2, total)
    scheme2.load_state_dict(saved[2])
    train(model2, [scheme2], opt2, loss, resume_at, stop, log)
    return model2, scheme2, [m["weight_density"] for m in log]


def test_movement_pruning_cubic_schedule_final_density_and_resume() -> None:
    model, scheme, densities = movement_run(20)
    assert scheme.warm_step == 2 and scheme.end_step == 12
    assert densities[0] == densities[1] == 1.0
    assert all(b <= a for a, b in zip(densities, densities[1:], strict=False))
    assert densities[4] > densities[8] > densities[11] > densities[12] == densities[-1] == 0.25  # update_every=2
    for name, numel in (("0", 192), ("2", 128)):
        assert int(scheme.masks[name].sum()) == count_kept(0.25, numel)
    layer0 = model[0].weight.detach()
    assert int((layer0 != 0).sum()) == count_kept(0.25, 192)
    assert cubic_density(0.25, 0.5) == pytest.approx(0.25 + 0.75 / 8)
    # layer 0 at step 6 (frac 0.4): count_kept(cubic(0.25, 0.4), 192) entries
    assert scheme.density_at(6) == pytest.approx(cubic_density(0.25, 0.4))

    resumed, scheme2, densities2 = movement_run(20, resume_at=7)
    assert densities2 == densities
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(scheme.masks[k], scheme2.masks[k]) for k in scheme.masks)
    assert all(torch.equal(scheme.scores[k], scheme2.scores[k]) for k in scheme.scores)


# =========================================================================== LPAF


def test_sparsity_aware_svd_all_ones_is_the_truncated_svd_exactly() -> None:
    w = torch.randn(24, 16, generator=gen(0), dtype=F64)
    u, v = sparsity_aware_svd(w, torch.ones(24, 16, dtype=torch.bool), 4)
    plain = LowRank.fit(w, LowRankSpec(rank=4))
    assert torch.equal(u, plain.u.detach()) and torch.equal(v, plain.v.detach())


def test_sparsity_aware_svd_beats_plain_svd_on_the_masked_error() -> None:
    w = torch.randn(24, 16, generator=gen(1), dtype=F64)
    mask = torch.rand(24, 16, generator=gen(2)) < 0.5
    u, v = sparsity_aware_svd(w, mask, 4)
    ours = masked_error(w, u @ v, mask)
    of_weight = masked_error(w, LowRank.fit(w, LowRankSpec(rank=4)).to_dense(), mask)
    of_pruned = masked_error(w, LowRank.fit(w * mask, LowRankSpec(rank=4)).to_dense(), mask)
    assert ours <= of_weight and ours <= of_pruned
    assert ours < 0.5 * min(of_weight, of_pruned)  # measured 15 vs 55 and 82
    importance = torch.rand(24, 16, generator=gen(3), dtype=F64)
    u, v = sparsity_aware_svd(w, importance, 4)
    plain = LowRank.fit(w, LowRankSpec(rank=4)).to_dense()
    assert masked_error(w, u @ v, importance) <= masked_error(w, plain, importance)


def test_sparsity_aware_svd_recovers_an_exactly_low_rank_matrix() -> None:
    g = gen(4)
    a = torch.randn(24, 3, generator=g, dtype=F64) @ torch.randn(3, 16, generator=g, dtype=F64)
    u, v = sparsity_aware_svd(a, torch.rand(24, 16, generator=g, dtype=F64) + 0.5, 3)
    assert torch.allclose(u @ v, a, atol=1e-9)
    mask = torch.rand(24, 16, generator=g) < 0.8
    u, v = sparsity_aware_svd(a * mask, mask, 3, iters=400, tol=0.0)  # the pruned entries are completed
    assert float((u @ v - a).norm() / a.norm()) < 1e-8


def test_sparsity_aware_svd_checks() -> None:
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match="rank must be an integer in \\[1, 4\\], got 5"):
        sparsity_aware_svd(w, torch.ones(6, 4), 5)
    with pytest.raises(ValueError, match="all zero"):
        sparsity_aware_svd(w, torch.zeros(6, 4), 2)
    with pytest.raises(ValueError, match="non-negative"):
        sparsity_aware_svd(w, -torch.ones(6, 4), 2)


def spectrum_mlp() -> nn.Sequential:
    """Two 32x32 layers: the first has a fast-decaying spectrum, the second a flat one."""
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    g = gen(0)
    for layer, decay in ((model[0], 0.5), (model[2], 0.85)):
        q1, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
        q2, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
        with torch.no_grad():
            layer.weight.copy_(q1 @ torch.diag(decay ** torch.arange(32.0)) @ q2.T)
    return model


def test_lpaf_prune_then_factorize_with_mixed_ranks(tmp_path: Path) -> None:
    model = spectrum_mlp()
    x = torch.randn(8, 32, generator=gen(5))
    ranks = mixed_ranks({"0": model[0].weight.detach(), "2": model[2].weight.detach()}, energy=0.9)
    assert ranks["0"] < ranks["2"], ranks  # mixed: each layer gets the rank its spectrum needs
    assert ranks["0"] == energy_rank(model[0].weight.detach(), 0.9)

    masks = movement_prune(model, 0.5)  # magnitude (no scores): half of each layer
    pruned = {n: model[int(n)].weight.detach().clone() for n in ("0", "2")}
    done = lpaf_factorize(model, energy=0.9, masks=masks)
    assert done == mixed_ranks(pruned, energy=0.9, masks=masks) and done["0"] < done["2"] < 16, done
    for name, w in pruned.items():
        fmt = model[int(name)].weight_format
        assert isinstance(fmt, LowRank) and fmt.spec.rank == done[name]
        ours = masked_error(w, fmt.to_dense(), masks[name])
        plain = masked_error(w, LowRank.fit(w, LowRankSpec(rank=done[name])).to_dense(), masks[name])
        assert ours < plain
    assert [d.site for d in model.kronc_plan.decisions] == [f"{n}.weight" for n in done]

    # fine-tuning trains every layer's own factors; save/load keeps the mixed ranks
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    y = torch.randn(8, 32, generator=gen(6))
    train(model, [], opt, lambda: (model(x) - y).square().mean(), 0, 2)
    kronc.save(model, tmp_path)
    loaded = kronc.load(tmp_path, model=lambda: nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_mixed_ranks_do_not_starve_wide_layers() -> None:
    """Same spectrum shape, one layer 4x wider: equal retained energy gives both about the same rank."""
    g = gen(11)
    s = 0.95 ** torch.arange(64, dtype=torch.float64)

    def with_spectrum(out: int) -> Tensor:
        u = torch.linalg.qr(torch.randn(out, 64, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64)).Q
        return (u * s) @ v.T

    weights = {"wide": with_spectrum(256), "square": with_spectrum(64)}
    ranks = mixed_ranks(weights, budget="4x", itemsize=8)
    assert (ranks["wide"] * 320 + ranks["square"] * 128) * 8 <= (256 * 64 + 64 * 64) * 8 / 4
    assert abs(ranks["wide"] - ranks["square"]) <= 2, ranks  # greedy gain-per-value alone: wide 9, square 17


def test_lpaf_budget_ranks_fit_the_budget_and_favour_the_flat_spectrum() -> None:
    model = spectrum_mlp()
    weights = {"0": model[0].weight.detach(), "2": model[2].weight.detach()}
    ranks = mixed_ranks(weights, budget="4x")
    assert sum(r * 64 for r in ranks.values()) * 4 <= 2 * 32 * 32 * 4 / 4
    assert sum(r * 64 for r in ranks.values()) * 4 > 2 * 32 * 32 * 4 / 4 - 64 * 4 * 2, "the budget is used"
    assert ranks["2"] > ranks["0"]
    done = lpaf_factorize(model, budget="4x")
    assert done == ranks
    assert sum(m.weight_format.nbytes() for m in model.modules() if isinstance(m, CompressedLinear)) <= 2048
    plan_model = spectrum_mlp()
    assert lpaf_factorize(plan_model, ranks=model.kronc_plan) == ranks
    with pytest.raises(ValueError, match="exactly one of"):
        lpaf_factorize(spectrum_mlp(), ranks=2, energy=0.5)


def test_lpaf_leaves_tied_and_unprofitable_layers_dense() -> None:
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "mid": nn.Linear(8, 8)})
    assert lpaf_factorize(model, ranks=2) == {"mid": 2}
    assert isinstance(model["head"], nn.Linear)
    assert lpaf_factorize(nn.Sequential(nn.Linear(8, 8)), ranks=4) == {}  # 4 * 16 = 64 values: no smaller


# =========================================================================== resume, errors, switches


def cmr_anneal_run(stop: int, resume_at: int | None) -> tuple[CompressedLinear, list[Scheme]]:
    layer = doped_layer(16, 16, (4, 4), 0.3, seed=8)
    x, y = torch.randn(16, 16, generator=gen(0)), torch.randn(16, 16, generator=gen(1))
    total = 8

    def make() -> list[Scheme]:
        return [OverlayAnnealing(0.1, end_fraction=0.75), CoMatrixDropout(p=0.3, seed=4)]

    schemes = make()
    for s in schemes:
        s.attach(layer, total)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    train(layer, schemes, opt, lambda: (layer(x) - y).square().mean(), 0, resume_at or stop)
    if resume_at is None:
        return layer, schemes
    saved = copy.deepcopy(([s.state_dict() for s in schemes], layer.state_dict(), opt.state_dict()))
    layer2 = doped_layer(16, 16, (4, 4), 0.3, seed=8)
    layer2.load_state_dict(saved[1])
    opt2 = torch.optim.Adam(layer2.parameters(), lr=1e-2)
    opt2.load_state_dict(saved[2])
    schemes2 = make()
    for s, state in zip(schemes2, saved[0], strict=True):
        s.attach(layer2, total)
        s.load_state_dict(state)
    train(layer2, schemes2, opt2, lambda: (layer2(x) - y).square().mean(), resume_at, stop)
    return layer2, schemes2


def test_annealing_and_cmr_resume_equals_uninterrupted() -> None:
    whole, schemes = cmr_anneal_run(8, None)
    resumed, schemes2 = cmr_anneal_run(8, 3)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(schemes[0].overlays[0].mask, schemes2[0].overlays[0].mask)
    for s in (*schemes, *schemes2):
        s.finish(whole if s in schemes else resumed)
    assert whole.weight_format.overlay.index.nnz == resumed.weight_format.overlay.index.nnz == count_kept(0.1, 256)


def lowrank_model() -> nn.Sequential:
    return nn.Sequential(*(CompressedLinear(LowRank.fit(torch.randn(8, 8, generator=gen(i)), LowRankSpec(rank=2)))
                           for i in range(4)))


def test_schemes_name_what_they_looked_for() -> None:
    msg = "OverlayAnnealing: no doped weights in the model (found formats: lowrank x 4)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        OverlayAnnealing(0.1).attach(lowrank_model(), 10)
    with pytest.raises(ValueError, match=re.escape("CoMatrixDropout: no doped weights with a structured base in the "
                                                   "model (found formats: dense linear x 1)")):
        CoMatrixDropout().attach(nn.Sequential(nn.Linear(4, 4)), 10)
    with pytest.raises(ValueError, match=re.escape("ReweightedGroupLasso: no dense Linear/Conv1D weights in the model "
                                                   "(found formats: lowrank x 4)")):
        ReweightedGroupLasso((2, 2)).attach(lowrank_model(), 10)
    with pytest.raises(ValueError, match="ReweightedGroupLasso: block=\\(3, 3\\) divides none"):
        ReweightedGroupLasso((3, 3)).attach(nn.Sequential(nn.Linear(4, 4)), 10)
    with pytest.raises(ValueError, match=re.escape("MovementScores: no dense Linear/Conv1D weights matching include='^head'")):
        MovementScores(include="^head").attach(nn.Sequential(nn.Linear(4, 4)), 10)
    with pytest.raises(ValueError, match="MovementPruning: no dense"):
        MovementPruning(0.5).attach(lowrank_model(), 10)
    with pytest.raises(ValueError, match="lpaf_factorize: no untied dense"):
        lpaf_factorize(lowrank_model(), ranks=1)
    with pytest.raises(ValueError, match="BlockMask: no dense Linear/Conv1D named fc"):
        BlockMask({"fc": torch.ones(2, 2, dtype=torch.bool)}, (2, 2)).attach(lowrank_model())
    layer = doped_layer(8, 8, (2, 2), 0.1)
    with pytest.raises(ValueError, match="fewer than start_density=0.5 needs"):
        OverlayAnnealing(0.05, start_density=0.5).attach(layer, 10)
    with pytest.raises(ValueError, match="fewer than target density 0.5 keeps"):
        OverlayAnnealing(0.5).attach(layer, 10)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: OverlayAnnealing(0.0), "OverlayAnnealing: target_density must be in (0, 1], got 0.0"),
        (lambda: OverlayAnnealing(1.5), "OverlayAnnealing: target_density must be in (0, 1], got 1.5"),
        (lambda: OverlayAnnealing(0.1, start_density=0.05), "start_density=0.05 is below target_density=0.1"),
        (lambda: OverlayAnnealing(0.1, schedule="step"), "schedule must be 'linear' or 'cosine'"),
        (lambda: OverlayAnnealing(0.1, end_fraction=0), "OverlayAnnealing: end_fraction must be in (0, 1]"),
        (lambda: CoMatrixDropout(p=1.0), "CoMatrixDropout: p must be in [0, 1), got 1.0"),
        (lambda: CoMatrixDropout(p=-0.1), "CoMatrixDropout: p must be in [0, 1), got -0.1"),
        (lambda: CoMatrixDropout(target="both"), "CoMatrixDropout: target must be 'overlay' or 'base'"),
        (lambda: ReweightedGroupLasso((0, 2)), "ReweightedGroupLasso: block must be positive"),
        (lambda: ReweightedGroupLasso((2, 2), strength=-1), "ReweightedGroupLasso: strength must be >= 0"),
        (lambda: ReweightedGroupLasso((2, 2), eps=0), "ReweightedGroupLasso: eps must be > 0"),
        (lambda: ReweightedGroupLasso((2, 2), refresh_every=0), "refresh_every must be a positive integer"),
        (lambda: ReweightedGroupLasso((2, 2), prune_density=2), "prune_density must be in (0, 1]"),
        (lambda: MovementPruning(0), "MovementPruning: final_density must be in (0, 1], got 0"),
        (lambda: MovementPruning(0.5, warmup_fraction=0.9, end_fraction=0.5), "end_fraction=0.5 must be after"),
        (lambda: prune_blocks(nn.Linear(4, 4), 0, (2, 2)), "prune_blocks: density must be in (0, 1], got 0"),
        (lambda: prune_blocks(nn.Linear(4, 4), "1MB", (2, 2)), "must be a ratio like '4x'"),
        (lambda: denser_plan(Plan(decisions=[]), 0.5), "denser_plan: factor must be at least 1"),
        (lambda: mixed_ranks({"a": torch.ones(4, 4)}, energy=1.5), "energy_rank: energy must be in (0, 1]"),
    ],
)
def test_bad_parameters_are_named(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_disabled_schemes_do_nothing() -> None:
    layer = doped_layer(8, 8, (2, 2), 0.25)
    fmt = layer.weight_format
    values = fmt.overlay.values.detach().clone()
    schemes: list[Scheme] = [OverlayAnnealing(0.05, enabled=False), CoMatrixDropout(p=0.9, enabled=False),
                             ReweightedGroupLasso((2, 2), enabled=False), MovementPruning(0.1, enabled=False)]
    for s in schemes:
        s.attach(layer, 4)  # no error although group lasso and movement pruning find nothing here
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    x = torch.randn(4, 8, generator=gen(0))
    train(layer, schemes, opt, lambda: layer(x).square().mean(), 0, 4)
    for s in schemes:
        s.finish(layer)
        assert s.metrics() == {}
    assert "forward" not in vars(fmt) and torch.equal(fmt.overlay.values.detach(), values)
