"""Capture: tracer choice, site discovery, tied weights, Conv1D orientation, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kronc.capture import CaptureError, capture
from kronc.tools.toy import FunctionalMLP, LSTMLanguageModel, toy_inputs

transformers = pytest.importorskip("transformers")
from kronc.tools.toy import tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402


def test_plain_module_uses_fx_and_finds_every_kind() -> None:
    c = capture(LSTMLanguageModel())
    assert c.method == "fx"
    kinds = {s.name: s.kind for s in c.sites}
    assert kinds == {
        "embedding.weight": "embedding",
        "lstm.weight_ih_l0": "lstm", "lstm.weight_hh_l0": "lstm",
        "lstm.weight_ih_l1": "lstm", "lstm.weight_hh_l1": "lstm",
        "decoder.weight": "linear",
    }
    assert c.site("lstm.weight_hh_l1").shape == (256, 64)
    assert "lstm_hh" in c.site("lstm.weight_hh_l1").tags
    assert all(len(s.uses) == 1 for s in c.sites)


def test_functional_linear_is_a_site() -> None:
    c = capture(FunctionalMLP())
    site = c.site("w2")
    assert site.kind == "functional" and site.shape == (16, 64) and site.owner == ""
    assert c.site("fc1.weight").kind == "linear"


@pytest.mark.slow
def test_gpt2_goes_through_export_with_tied_head_and_transposed_conv1d() -> None:
    model = tiny_gpt2()
    c = capture(model, {"input_ids": toy_inputs("gpt2")})
    assert c.method == "export"
    wte = c.site("transformer.wte.weight")
    assert wte.aliases == ("lm_head.weight",) and {"tied", "lm_head", "embedding"} <= wte.tags
    assert {u.role for u in wte.uses} == {"embedding", "linear"}
    attn = c.site("transformer.h.0.attn.c_attn.weight")
    assert attn.kind == "conv1d" and attn.shape == (192, 64)  # stored (64, 192)
    assert torch.equal(c.weight(attn), model.transformer.h[0].attn.c_attn.weight.T)
    assert len(c.sites) == 2 + 4 * 2  # wte(+head), wpe, 4 Conv1D per block


def test_hf_models_use_dummy_inputs_when_none_given() -> None:
    c = capture(tiny_llama())
    assert c.method == "export"
    names = [s.name for s in c.sites]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    assert "lm_head" in c.site("lm_head.weight").tags and not c.site("lm_head.weight").aliases
    assert sum(s.kind == "linear" for s in c.sites) == 7 * 2 + 1


def test_bert_sites() -> None:
    c = capture(tiny_bert(), {"input_ids": toy_inputs("bert")})
    assert sum(s.kind == "embedding" for s in c.sites) == 3
    assert sum(s.kind == "linear" for s in c.sites) == 6 * 2 + 1  # + pooler


def test_capture_does_not_modify_the_model() -> None:
    model = LSTMLanguageModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow defeats fx
            return self.fc(x)
        return x


def test_untraceable_model_names_the_tracer_and_asks_for_inputs() -> None:
    with pytest.raises(CaptureError, match=r"symbolic_trace failed.*example inputs"):
        capture(Untraceable())


def test_non_module_is_rejected() -> None:
    with pytest.raises(CaptureError, match="needs an nn.Module"):
        capture(lambda x: x)  # type: ignore[arg-type]
