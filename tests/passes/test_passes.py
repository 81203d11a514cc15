"""Graph rewrite and module swap against the dense model, and the checks after a rewrite."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from kronc.capture import capture
from kronc.formats import Factorized, KroneckerSpec, LowRankSpec, fit
from kronc.modules import CompressedEmbedding, CompressedLinear, CompressedLSTM
from kronc.passes.rewrite import compress_sites
from kronc.passes.swap import SwapError, swap_modules
from kronc.passes.verify import PassError, output_signature, verify
from kronc.tools.toy import FunctionalMLP, LSTMLanguageModel, toy_inputs


def exact_weights(c) -> dict[str, Factorized]:  # type: ignore[no-untyped-def]
    """Full-rank low-rank fits: a change of representation that must not change outputs."""
    return {s.name: fit(c.weight(s).double(), LowRankSpec(rank=min(s.shape))).float() for s in c.sites}


def test_graph_rewrite_of_fx_graph_matches_dense_and_drops_dense_weights() -> None:
    torch.manual_seed(0)
    model = FunctionalMLP()
    x = toy_inputs("mlp")
    c = capture(model)
    gm = compress_sites(copy.deepcopy(c.graph_module), c.sites, exact_weights(c))
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert any(str(t).startswith("kronc_w2") for t in targets)
    assert isinstance(gm.get_submodule("fc1"), CompressedLinear)
    assert not hasattr(gm, "w2"), "the dense functional weight must be gone from the graph module"
    assert isinstance(model.w2, nn.Parameter), "the user's model keeps its weights"


@pytest.mark.slow
def test_graph_rewrite_of_lstm_lm() -> None:
    torch.manual_seed(0)
    model = LSTMLanguageModel()
    x = toy_inputs("lstm")
    c = capture(model)
    gm = compress_sites(copy.deepcopy(c.graph_module), c.sites, exact_weights(c))
    assert isinstance(gm.get_submodule("lstm"), CompressedLSTM)
    assert isinstance(gm.get_submodule("embedding"), CompressedEmbedding)
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_compressed_lstm_matches_nn_lstm_with_state_and_layouts() -> None:
    torch.manual_seed(0)
    for batch_first in (True, False):
        lstm = nn.LSTM(6, 5, num_layers=2, batch_first=batch_first).double()
        comp = CompressedLSTM(lstm, {})
        x = torch.randn(3, 4, 6, dtype=torch.float64)
        h0 = (torch.randn(2, 3 if batch_first else 4, 5, dtype=torch.float64),) * 2
        ref, (h, c) = lstm(x, h0)
        out, (h2, c2) = comp(x, h0)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(h2, h)
        torch.testing.assert_close(c2, c)
    unbatched = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(comp(unbatched)[0], lstm(unbatched)[0])


def test_bidirectional_lstm_is_refused() -> None:
    with pytest.raises(ValueError, match="unidirectional"):
        CompressedLSTM(nn.LSTM(4, 4, bidirectional=True), {})


def test_module_swap_refuses_functional_sites_with_a_hint() -> None:
    model = FunctionalMLP()
    c = capture(model)
    with pytest.raises(SwapError, match=r"F.linear.*output='graph'"):
        swap_modules(copy.deepcopy(model), c.sites, exact_weights(c))


def test_verify_names_the_rewrite_that_broke_the_outputs() -> None:
    model = FunctionalMLP()
    x = toy_inputs("mlp")
    gm = fx.symbolic_trace(model)
    expected = output_signature(gm, (x,))
    assert expected is not None and verify(gm, "nothing", (x,), expected=expected) is not None

    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        cut = gm.graph.call_function(torch.narrow, (out.args[0], 1, 0, 3))
    out.args = (cut,)
    with pytest.raises(PassError, match="'truncate_output' changed the outputs"):
        verify(gm, "truncate_output", (x,), expected=expected)


transformers = pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_hf_graph_rewrite_and_module_swap_agree_with_dense(name: str) -> None:
    from kronc.tools.toy import TOY_MODELS

    torch.manual_seed(0)
    model = TOY_MODELS[name]()
    ids = toy_inputs(name)
    c = capture(model, {"input_ids": ids})
    weights = exact_weights(c)
    ref = model(input_ids=ids)[0]
    swapped = swap_modules(copy.deepcopy(model), c.sites, weights)
    assert type(swapped) is type(model)
    torch.testing.assert_close(swapped(input_ids=ids)[0], ref, atol=1e-4, rtol=1e-4)
    expected = output_signature(c.graph_module, c.example_args, c.example_kwargs)
    gm = compress_sites(copy.deepcopy(c.graph_module), c.sites, weights)
    verify(gm, "compress_sites", c.example_args, c.example_kwargs, expected)
    torch.testing.assert_close(gm(**c.example_kwargs)[0], ref, atol=1e-4, rtol=1e-4)
    dense_names = {n for n, _ in gm.named_parameters()}
    assert not any(s.name in dense_names for s in c.sites)


@pytest.mark.slow
def test_tied_gpt2_weights_stay_tied_after_swap() -> None:
    from kronc.tools.toy import tiny_gpt2

    model = tiny_gpt2()
    c = capture(model, {"input_ids": toy_inputs("gpt2")})
    site = c.site("transformer.wte.weight")
    weights = {site.name: fit(c.weight(site), KroneckerSpec(a_shape=(8, 8), terms=2))}
    swapped = swap_modules(copy.deepcopy(model), c.sites, weights)
    assert swapped.lm_head.weight_format is swapped.transformer.wte.weight_format
    out = swapped.generate(toy_inputs("gpt2")[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
