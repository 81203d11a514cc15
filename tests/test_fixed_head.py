"""A tied embedding/LM head stored at a fixed precision outside the budget (`Policy.fixed`).

`TiedLM` (fx-traceable, vocabulary 96, width 64) has one site for the embedding and the head (a lookup
and a product) and two decoder linears, planned under the budget as before. The Hugging Face tied Llama
(save/load) and torch.compile tests are slow.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kronc
from kronc.codegen.ops import quant
from kronc.formats import Dense, DenseSpec
from kronc.modules import CompressedEmbedding, CompressedLinear
from kronc.plan import Plan
from kronc.planning import PlanningError
from kronc.policies import PolicyError, PolicyWarning, load_policy
from kronc.values import Precision, QuantizedTensor, codec

VOCAB, WIDTH = 96, 64
INT8 = {"dtype": "int8"}
INT4G64 = {"dtype": "int4", "group_size": 64}
DECODER = {"default_formats": [{"kind": "dense", "precisions": ["keep", {"dtype": "int8"}, INT4G64]}]}
HEAD = "emb.weight"


class TiedLM(nn.Module):
    """Embedding, two linears, an LM head sharing the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.up, self.down = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.emb.weight

    def body(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return h + self.down(torch.tanh(self.up(h)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body(ids))


def policy(head: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    fixed = [] if head is None else [{"match": "lm_head", "precision": head, "name": "head"}]
    return {"budget": "5x", **DECODER, "fixed": fixed, **extra}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return TiedLM().eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def captured(model: nn.Module) -> kronc.Captured:
    return kronc.capture(model)


@pytest.fixture(scope="module")
def small(captured: kronc.Captured) -> nn.Module:
    return kronc.apply(captured, kronc.plan(captured, policy(INT8)))


def test_default_policy_leaves_the_tied_head_alone(captured: kronc.Captured) -> None:
    assert load_policy({"budget": "5x"}).fixed == []
    plan = kronc.plan(captured, policy(None))
    assert HEAD not in plan.sites and all(d.budgeted for d in plan.decisions)
    assert plan.total_ratio == plan.ratio
    assert "budgeted" not in json.dumps(plan.model_dump(mode="json"))  # plans without fixed sites: unchanged files
    small = kronc.apply(captured, plan)
    assert type(small.emb) is nn.Embedding and type(small.lm_head) is nn.Linear


def test_fixed_head_is_outside_the_budget_and_priced_exactly(captured: kronc.Captured, tmp_path: Path) -> None:
    base = kronc.plan(captured, policy(None))
    plan = kronc.plan(captured, policy(INT4G64))
    head = plan[HEAD]
    assert not head.budgeted and head.rule == "head" and head.values == "int4g64"
    assert head.bytes_before == VOCAB * WIDTH * 4
    assert head.bytes_after == Precision(**INT4G64).nbytes((VOCAB, WIDTH)) == VOCAB * (WIDTH // 2 + 2)
    assert 0 < head.error < 0.2
    # the budget's solve is the same with or without the fixed site, and its ratio leaves the head out
    assert [d for d in plan.decisions if d.budgeted] == base.decisions
    assert plan.ratio == base.ratio >= 5
    total = (base.bytes_before + head.bytes_before) / (base.bytes_after + head.bytes_after)
    assert plan.total_ratio == pytest.approx(total) and plan.total_ratio != plan.ratio
    assert "total (budget)" in plan.table() and "total (with fixed)" in plan.table()
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan


def unique_bytes(m: nn.Module) -> int:
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()]}.values())


def test_fixed_head_stays_tied_and_is_stored_once(model: nn.Module, small: nn.Module) -> None:
    emb, head = small.emb, small.lm_head
    assert isinstance(emb, CompressedEmbedding) and isinstance(head, CompressedLinear)
    assert emb.weight_format is head.weight_format
    stored = head.weight_format.weight
    assert isinstance(stored, QuantizedTensor)
    assert stored.nbytes() == head.weight_format.nbytes() == Precision(**INT8).nbytes((VOCAB, WIDTH)) == VOCAB * (WIDTH + 2)
    assert small.kronc_plan[HEAD].bytes_after == stored.nbytes()
    shared = [n for n, t in small.state_dict().items() if t.data_ptr() == stored.codes.data_ptr()]
    assert len(shared) == 2  # one tensor, two names (embedding and head)
    plan = small.kronc_plan  # the model holds the plan's bytes exactly, the head's once
    assert unique_bytes(small) == unique_bytes(model) - sum(d.bytes_before - d.bytes_after for d in plan.decisions)


@pytest.mark.parametrize("head", [INT8, INT4G64], ids=["int8", "int4g64"])
def test_quantized_head_logits_match_the_dequantized_matmul(captured: kronc.Captured, ids: torch.Tensor,
                                                            head: dict[str, Any]) -> None:
    small = kronc.apply(captured, kronc.plan(captured, policy(head)))
    stored = small.lm_head.weight_format.weight
    w = stored.dequantize()
    with torch.no_grad():
        hidden = small.body(ids)
        ref = hidden @ w.T
        # 16 tokens in float32: the dequantized float32 product (tight)
        torch.testing.assert_close(small.lm_head(hidden), ref, rtol=1e-5, atol=1e-5)
        # one token (decode): the packed kernel on a bfloat16 copy of x, within 1% of the logits' scale
        one = hidden[:, -1:]
        assert quant.cpu_path(one, stored.scales, stored.minima, stored.precision.bits, 1, inference=True).endswith("pack")
        err = (small.lm_head(one) - ref[:, -1:]).abs().max()
        assert err <= 0.01 * ref.abs().max()
        # the lookup gives the dequantized rows exactly
        assert torch.equal(small.emb(ids), w[ids])


def test_lookup_decodes_only_the_gathered_rows(small: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, ...]] = []
    original = codec.decode_parts

    def spy(codes: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shapes.append(tuple(codes.shape))
        return original(codes, *args, **kwargs)

    monkeypatch.setattr(codec, "decode_parts", spy)
    index = torch.tensor([[3, 95, 3]])
    rows = small.emb(index)
    assert shapes == [(3, WIDTH)]
    monkeypatch.undo()
    assert torch.equal(rows, small.lm_head.weight_format.weight.dequantize()[index])


def test_save_load_round_trip_is_bit_exact(small: nn.Module, ids: torch.Tensor, tmp_path: Path) -> None:
    kronc.save(small, tmp_path / "s")
    back = kronc.load(tmp_path / "s", TiedLM)
    assert back.emb.weight_format is back.lm_head.weight_format
    a, b = small.lm_head.weight_format.weight, back.lm_head.weight_format.weight
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and a.precision == b.precision
    assert not back.kronc_plan[HEAD].budgeted
    with torch.no_grad():
        assert torch.equal(back(ids), small(ids))


@pytest.mark.slow
def test_hugging_face_tied_llama_round_trip_and_generate(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    small = kronc.compile(hf, policy=policy(INT4G64), example_inputs=(ids,))
    assert small.model.embed_tokens.weight_format is small.lm_head.weight_format
    assert not small.kronc_plan["model.embed_tokens.weight"].budgeted
    kronc.save(small, tmp_path / "s")
    back = kronc.load(tmp_path / "s")
    assert back.model.embed_tokens.weight_format is back.lm_head.weight_format
    with torch.no_grad():
        assert torch.equal(back(ids).logits, small(ids).logits)
        assert torch.equal(back.generate(ids, max_new_tokens=3, do_sample=False),
                           small.generate(ids, max_new_tokens=3, do_sample=False))


class TwoUses(nn.Module):
    """Lookup, a nonlinearity, the tied head: the two uses of one compressed table."""

    def __init__(self, fmt: nn.Module) -> None:
        super().__init__()
        self.emb, self.head = CompressedEmbedding(fmt), CompressedLinear(fmt)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(index)))


@pytest.mark.slow
@pytest.mark.parametrize("head", [INT8, INT4G64], ids=["int8", "int4g64"])
def test_compile_fullgraph_matches_eager(head: dict[str, Any]) -> None:
    torch.manual_seed(2)
    fmt = Dense(torch.randn(VOCAB, WIDTH), DenseSpec(precision=Precision(**head)))
    toy = TwoUses(fmt).eval()
    compiled = torch.compile(toy, fullgraph=True)
    with torch.no_grad():
        for index in (torch.tensor([[5]]), torch.tensor([[1, 2, 3, 90]])):  # decode-size (packed kernels) inputs
            torch.testing.assert_close(compiled(index), toy(index), rtol=1e-5, atol=1e-5)


def test_bad_fixed_options_are_clear_errors(captured: kronc.Captured) -> None:
    with pytest.raises(PlanningError, match=r"emb\.weight: head\.precision int4g128.*allowed group sizes.*64"):
        kronc.plan(captured, policy({"dtype": "int4", "group_size": 128}))
    with pytest.raises(PolicyError, match=r"fixed.*precision.*dtype"):
        load_policy(policy({"dtype": "int5"}))
    with pytest.raises(PolicyError, match=r"fixed.*match"):
        load_policy({"budget": "5x", "fixed": [{"match": [], "precision": INT8}]})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        kronc.explain({**policy(INT8), "fixed": [{"match": "no_such_head", "precision": INT8}]}, captured)
    assert any(issubclass(w.category, PolicyWarning) and "fixed[0] 'no_such_head': matches no site" in str(w.message)
               for w in seen)


def test_explain_names_the_fixed_entry(captured: kronc.Captured) -> None:
    table = kronc.explain(policy(INT8), captured).table()
    line = next(row for row in table.splitlines() if row.startswith(HEAD))
    assert "fixed at int8, outside the budget" in line and "head" in line and "dense at int8 (fixed)" in line
