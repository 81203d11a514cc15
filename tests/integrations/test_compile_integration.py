"""torch.compile and torch.export of compressed models, and the ``"kronc"`` torch.compile backend.

Most checks compile with ``backend="aot_eager"``: it traces exactly what inductor would get
(dynamo graph, then aot_autograd on fake tensors) without inductor's C++ code generation, which is
slow on CPU; ``fullgraph=True`` raises on any graph break. Two tests run real inductor compiles
on a tiny MLP (skip them with ``KRONC_SKIP_INDUCTOR=1``); the AOTInductor round trip is opt-in
(``KRONC_AOTI=1``, about 30 s).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import kronc
from kronc.formats import LowRankSpec
from kronc.integrations.torch_compile import kronc_backend, qualified_name
from kronc.plan import Decision, Plan
from kronc.policies import Policy
from kronc.tools.toy import TOY_MODELS, toy_inputs

pytestmark = pytest.mark.slow  # torch.compile (inductor) and torch.export of compressed models: seconds per test

POLICY = Policy(budget="4x")
MODELS = ["gpt2", "llama", "lstm"]
HF = {"gpt2", "llama"}
kronc.register_backend()  # torch.compile(backend="kronc") below
ATOL = 1e-5

inductor = pytest.mark.skipif(
    os.environ.get("KRONC_SKIP_INDUCTOR") == "1" or shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="real inductor compiles need a C++ compiler (KRONC_SKIP_INDUCTOR=1 skips them)",
)


def logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]


def kronc_ops(graph: torch.fx.Graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("kronc.")}


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def compressed() -> dict[str, tuple[nn.Module, nn.Module, Plan]]:
    """name -> (dense model, kronc.compile'd model, plan), built once for the file."""
    out = {}
    for name in MODELS:
        if name in HF:
            pytest.importorskip("transformers")
        torch.manual_seed(0)
        model = TOY_MODELS[name]()
        small, report = kronc.compile(model, policy=POLICY, report=True)
        out[name] = (model, small.eval(), report.plan)
    return out


# ------------------------------------------------------------------ compressed models under torch.compile / export


@pytest.mark.parametrize("name", MODELS)
def test_fullgraph_compile_of_compressed_model_matches_eager(name: str, compressed: dict) -> None:
    _, small, _ = compressed[name]
    x = toy_inputs(name)
    compiled = torch.compile(small, backend="aot_eager", fullgraph=True)  # raises on any graph break
    with torch.no_grad():
        ref = logits(small(x))
        out = logits(compiled(x))
        again = logits(compiled(toy_inputs(name, seed=1)))  # same shapes: no recompile needed
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    assert again.shape == ref.shape


def test_compressed_lstm_is_one_graph(compressed: dict) -> None:
    """The time loop unrolls into the graph (nn.LSTM itself is a dynamo graph break)."""
    _, small, _ = compressed["lstm"]
    with torch.no_grad():
        explanation = torch._dynamo.explain(small)(toy_inputs("lstm", seq=4))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("name", MODELS)
def test_export_of_compressed_model_matches_eager(name: str, compressed: dict) -> None:
    _, small, _ = compressed[name]
    x = toy_inputs(name)
    kwargs = {"use_cache": False} if name in HF else {}
    with torch.no_grad():
        ep = torch.export.export(small, (x,), kwargs=kwargs, strict=False)
        out = logits(ep.module()(x, **kwargs))
        ref = logits(small(x, **kwargs))
    assert kronc_ops(ep.graph), "the kronc:: ops should stay single nodes in the exported graph"
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)


def test_exported_program_saves_and_loads(compressed: dict, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, small, _ = compressed["lstm"]
    x = toy_inputs("lstm")
    with torch.no_grad():
        torch.export.save(torch.export.export(small, (x,), strict=False), tmp_path / "lstm.pt2")
        loaded = torch.export.load(tmp_path / "lstm.pt2")
        torch.testing.assert_close(loaded.module()(x), small(x), atol=ATOL, rtol=ATOL)


def test_compressed_linear_fuses_bias_into_the_op() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    spec = LowRankSpec(rank=4)
    plan = Plan(decisions=[
        Decision(site=f"{i}.weight", shape=shape, spec=spec, bytes_before=shape[0] * shape[1] * 4,
                 bytes_after=spec.nbytes(shape, 4), params_after=spec.nparams(shape))
        for i, shape in ((0, (48, 32)), (2, (16, 48)))
    ])
    small = kronc.apply(model, plan)
    x = torch.randn(5, 32)
    with torch.no_grad():
        ep = torch.export.export(small, (x,))
        h = torch.randn(5, 48)
        layer = small[2]
        torch.testing.assert_close(layer(h), h @ layer.weight_format.to_dense().T + layer.bias, atol=1e-5, rtol=1e-5)
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    lowrank = [n for n in calls if str(n.target) == "kronc.lowrank_linear.default"]
    assert len(lowrank) == 2 and all(len(n.args) == 4 and n.args[3] is not None for n in lowrank)
    assert not [n for n in calls if "add" in str(n.target)], "the bias add should be inside the op"
    dense = kronc.CompressedLinear(kronc.formats.Dense(model[0].weight.detach()), model[0].bias.detach())
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model[0](x))


# ------------------------------------------------------------------ the "kronc" backend


def test_backend_is_registered_by_register_backend() -> None:
    from torch._dynamo.backends.registry import lookup_backend

    kronc.register_backend()
    kronc.register_backend()  # idempotent
    assert lookup_backend("kronc") is kronc_backend


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_backend_compresses_like_kronc_compile(name: str, compressed: dict) -> None:
    """Same sites, names and weights as kronc.compile -> the same plan and the same outputs."""
    model, small, plan = compressed[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plans: list[Plan] = []
    compiled = torch.compile(model, backend="kronc", fullgraph=True,
                             options={"policy": POLICY, "inner": "aot_eager", "on_plan": plans.append})
    x = toy_inputs(name)
    with torch.no_grad():
        out = logits(compiled(x))
        ref = logits(small(x))
    assert len(plans) == 1 and plans[0].decisions == plan.decisions
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model was modified"


def test_backend_plans_each_graph_separately() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.a(x)
            torch._dynamo.graph_break()
            x = torch.relu(x) * 2  # a graph with no weights: passed on as it is
            torch._dynamo.graph_break()
            return self.b(x)

    torch.manual_seed(0)
    model = Broken().eval()
    plans: list[Plan] = []
    compiled = torch.compile(model, backend="kronc", options={"budget": "4x", "inner": "eager", "on_plan": plans.append})
    x = torch.randn(4, 32)
    with torch.no_grad():
        out = compiled(x)
    assert [p.sites for p in plans] == [["a.weight"], ["b.weight"]]
    assert all(p.ratio >= 4 for p in plans)
    a = kronc.apply(nn.Sequential(model.a), Plan(decisions=[plans[0].decisions[0].model_copy(update={"site": "0.weight"})]))
    b = kronc.apply(nn.Sequential(model.b), Plan(decisions=[plans[1].decisions[0].model_copy(update={"site": "0.weight"})]))
    with torch.no_grad():
        torch.testing.assert_close(out, b(torch.relu(a(x)) * 2), atol=ATOL, rtol=ATOL)


def test_backend_option_errors() -> None:
    model, x = TOY_MODELS["mlp"](), toy_inputs("mlp")
    with pytest.raises(Exception, match="needs a budget or a policy"):
        torch.compile(model, backend="kronc", options={"inner": "eager"})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown kronc backend option"):
        torch.compile(model, backend="kronc", options={"budget": "4x", "bugdet": "4x"})(x)


def test_qualified_names_from_dynamo_sources() -> None:
    assert qualified_name("L['self']._modules['fc']._parameters['weight']") == "fc.weight"
    assert qualified_name("L['self'].model.layers.0.mlp") == "model.layers.0.mlp"
    assert qualified_name("G['net']._modules['0']._parameters['bias']") == "net.0.bias"
    # a decorated forward(*args): the module is args[0] (transformers 5.24's Llama)
    assert qualified_name("L['args'][0]._modules['model']._parameters['w']") == "model.w"
    assert qualified_name("L['args'][1]._parameters['w']") == "args.1.w"
    assert qualified_name("not a source") is None


# ------------------------------------------------------------------ real inductor compiles (slow on CPU)


@inductor
def test_inductor_compile_of_compressed_mlp() -> None:
    torch.manual_seed(0)
    model, x = TOY_MODELS["mlp"](), toy_inputs("mlp")
    small = kronc.compile(model, policy=POLICY)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(small, fullgraph=True)(x), small(x), atol=ATOL, rtol=ATOL)


@inductor
def test_kronc_backend_into_inductor() -> None:
    torch.manual_seed(0)
    model, x = TOY_MODELS["mlp"](), toy_inputs("mlp")
    small = kronc.compile(model, policy=POLICY)
    with torch.no_grad():
        out = torch.compile(model, backend="kronc", options={"policy": POLICY})(x)
        torch.testing.assert_close(out, small(x), atol=ATOL, rtol=ATOL)


@pytest.mark.skipif(os.environ.get("KRONC_AOTI") != "1", reason="AOTInductor round trip is opt-in: KRONC_AOTI=1")
def test_aot_inductor_package(compressed: dict, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, small, _ = compressed["lstm"]
    x = toy_inputs("lstm")
    with torch.no_grad():
        ep = torch.export.export(small, (x,), strict=False)
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "lstm.pt2"))
        torch.testing.assert_close(torch._inductor.aoti_load_package(path)(x), small(x), atol=1e-4, rtol=1e-4)
