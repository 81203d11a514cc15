"""The training path (`kronc.formats.training`): a transient dense weight, built with autograd, gives the same
outputs and gradients as the factored ops for every format; the choice follows the FLOP counts, and
inference, evaluation and tracing keep the factored ops.

Tolerances: float64 throughout, so the two paths differ by rounding only (relative 1e-10)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kronc.formats import (
    BlockSparse,
    BlockSparseSpec,
    Dense,
    DenseSpec,
    Doped,
    DopedSpec,
    Factorized,
    Kronecker,
    KroneckerSpec,
    LowRank,
    LowRankSpec,
)
from kronc.formats.quantlr import QuantLowRank, QuantLowRankSpec
from kronc.formats.training import dense_pays, dense_training, set_dense_training, training_weight
from kronc.modules import CompressedLinear, CompressedLSTM
from kronc.values import Precision

F64 = torch.float64
OUT, IN = 24, 48


def weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed), dtype=F64)


FITS: dict[str, tuple[type[Factorized], object]] = {
    "kronecker": (Kronecker, KroneckerSpec(a_shape=(4, 6), terms=3)),
    "doped-kron": (Doped, DopedSpec(base=KroneckerSpec(a_shape=(4, 6), terms=2), density=0.05)),
    "doped-lowrank": (Doped, DopedSpec(base=LowRankSpec(rank=3), density=0.05)),
    "pruned": (Doped, DopedSpec(density=0.2)),
    "blocksparse": (BlockSparse, BlockSparseSpec(block=(4, 6), density=0.5)),
    "lowrank": (LowRank, LowRankSpec(rank=5)),
    "dense": (Dense, DenseSpec()),
    "quantlr": (QuantLowRank, QuantLowRankSpec(base=Precision(dtype="int4", group_size=16), rank=3)),
}


def layer(name: str) -> CompressedLinear:
    kind, spec = FITS[name]
    fmt = kind.fit(weight(), spec)  # type: ignore[attr-defined]
    return CompressedLinear(fmt, torch.randn(OUT, dtype=F64, requires_grad=True)).to(F64)


def step(module: nn.Module, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every gradient (input and parameters) of one loss under training path ``mode``."""
    x = x.detach().clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    with dense_training(mode):
        y = module(x)
        y = y[0] if isinstance(y, tuple) else y
        (y.sin() * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), {"x": x.grad.clone(), **grads}


@pytest.mark.parametrize("name", sorted(FITS))
def test_the_dense_training_path_matches_the_factored_ops(name: str) -> None:
    m = layer(name)
    x = torch.randn(3, 7, IN, generator=torch.Generator().manual_seed(1), dtype=F64)
    y_dense, g_dense = step(m, x, "always")
    y_fact, g_fact = step(m, x, "never")
    assert set(g_dense) == set(g_fact) and {"x", "bias"} <= set(g_dense)
    torch.testing.assert_close(y_dense, y_fact, rtol=1e-10, atol=1e-10)
    for k in g_fact:
        torch.testing.assert_close(g_dense[k], g_fact[k], rtol=1e-10, atol=1e-10, msg=f"{name}: gradient of {k}")


@pytest.mark.parametrize("name", ["kronecker", "doped-kron", "blocksparse", "lowrank"])
def test_the_dense_weight_is_the_formats_matrix(name: str) -> None:
    fmt = layer(name).weight_format
    torch.testing.assert_close(fmt.dense_weight(F64), fmt.to_dense(), rtol=1e-12, atol=1e-12)


def test_the_choice_follows_the_flop_counts() -> None:
    kron = Kronecker.fit(weight(), KroneckerSpec(a_shape=(4, 6), terms=1))  # 3/4 of the dense FLOPs
    low = layer("lowrank").weight_format
    assert kron.flops_per_token() < 2 * OUT * IN
    assert dense_pays(kron, 512, True)  # at 4x a GEMM's cost per FLOP, the factored ops lose
    assert not dense_pays(kron, 1, True)  # one token does not pay for building the matrix
    assert not dense_pays(low, 512, True)  # rank 5 of 24x48: far fewer FLOPs than the GEMM
    x = torch.randn(512, IN, dtype=F64)
    assert training_weight(kron, x) is not None
    assert training_weight(kron, x[:1]) is None
    assert training_weight(low, x) is None


def test_a_doped_overlay_costs_its_sparse_products_on_top_of_the_base() -> None:
    """The LSTM policy's doped gate matrices (Kronecker base, 1-5% overlay): the overlay's sparse product costs
    far more per FLOP than the base's, so at a sequence's tokens the transient dense weight wins, where a
    0.5% overlay (as on SmolLM2) leaves the choice to the base."""
    from kronc.formats.doped import OVERLAY_OVERHEAD

    w = torch.randn(1024, 256, generator=torch.Generator().manual_seed(3))
    base = KroneckerSpec(a_shape=(32, 16), terms=2)
    dense_overlay = Doped.fit(w, DopedSpec(base=base, density=0.03))
    thin_overlay = Doped.fit(w, DopedSpec(base=base, density=0.0005))
    kron = Kronecker.fit(w, base)
    nnz = dense_overlay.overlay.values.numel()
    assert dense_overlay.factored_cost() == pytest.approx(kron.factored_cost() + 2 * nnz * OVERLAY_OVERHEAD)
    assert dense_overlay.factored_cost() > dense_overlay.flops_per_token() * Doped.factored_overhead  # the old rule
    tokens = 32 * 35  # an LSTM recurrent weight's rows over a 32 x 35 batch
    assert dense_pays(dense_overlay, tokens, True)
    assert dense_pays(thin_overlay, tokens, True) == dense_pays(kron, tokens, True)
    assert not dense_pays(dense_overlay, 1, True)  # one token still does not pay for building W


def test_inference_and_frozen_weights_keep_the_factored_ops() -> None:
    m = layer("kronecker")
    x = torch.randn(512, IN, dtype=F64)
    fmt = m.weight_format
    with torch.no_grad():
        assert training_weight(fmt, x) is None  # evaluation
    for p in m.parameters():
        p.requires_grad_(False)
    assert training_weight(fmt, x) is None  # nothing needs a gradient
    assert training_weight(fmt, x.requires_grad_(True)) is not None  # the input's gradient still pays
    with dense_training("never"):
        assert training_weight(fmt, x) is None


def test_a_scheme_that_wraps_the_forward_keeps_it() -> None:
    from kronc.recover.schemes import CoMatrixDropout

    m = layer("doped-kron")
    x = torch.randn(512, IN, dtype=F64)
    assert training_weight(m.weight_format, x) is not None
    scheme = CoMatrixDropout(p=0.5)
    scheme.attach(m, 1)
    assert training_weight(m.weight_format, x) is None  # the dropout wrapper must run
    scheme.finish(m)
    assert training_weight(m.weight_format, x) is not None


def test_tracing_keeps_the_kronc_ops() -> None:
    m = layer("kronecker")
    x = torch.randn(64, IN, dtype=F64)
    with dense_training("always"):
        ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("kron_linear" in t for t in targets), targets


def test_bad_mode_is_named() -> None:
    with pytest.raises(ValueError, match="one of auto, never, always, got 'sometimes'"):
        set_dense_training("sometimes")  # type: ignore[arg-type]


def test_the_lstm_builds_its_weights_once_per_sequence_and_matches() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(12, 16, num_layers=2, batch_first=True).to(F64)
    formats = {"weight_hh_l0": Kronecker.fit(lstm.weight_hh_l0.detach(), KroneckerSpec(a_shape=(8, 4), terms=2)),
               "weight_ih_l1": Kronecker.fit(lstm.weight_ih_l1.detach(), KroneckerSpec(a_shape=(8, 4), terms=2))}
    model = CompressedLSTM(lstm, formats).to(F64)
    x = torch.randn(2, 9, 12, dtype=F64)
    built: list[int] = []
    real = Kronecker.dense_weight

    def counting(self: Kronecker, dtype: torch.dtype) -> torch.Tensor:
        built.append(1)
        return real(self, dtype)

    Kronecker.dense_weight = counting  # type: ignore[method-assign]
    try:
        y_dense, g_dense = step(model, x, "always")
    finally:
        Kronecker.dense_weight = real  # type: ignore[method-assign]
    assert len(built) == 2  # one per compressed weight, not one per time step
    y_fact, g_fact = step(copy.deepcopy(model), x, "never")
    torch.testing.assert_close(y_dense, y_fact, rtol=1e-10, atol=1e-10)
    for k in g_fact:
        torch.testing.assert_close(g_dense[k], g_fact[k], rtol=1e-10, atol=1e-10, msg=k)
