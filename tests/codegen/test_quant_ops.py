"""``kronc::quant_linear`` on CPU: every path against dequantize-then-``F.linear``, the path rule,
input checks, autograd, ``torch.compile(fullgraph=True)`` and ``torch.export``.

Tolerance: ``max|y - ref| <= tol * max|ref|`` with tol 1e-5 for float32 activations and 2e-2 for
bfloat16 (the packed kernels and the bf16 GEMM round the activations and partial sums to bf16). The
packed kernels always compute in bf16 (float32/float16 ``x`` is cast, the output cast back), so their
tolerance is bf16's whatever ``x``'s dtype; decode-sized float32 inputs take them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kronc.codegen.ops import OpInputError
from kronc.codegen.ops.quant import DECODE_MAX_TOKENS, cpu_path, quant_linear_cpu
from kronc.values import Precision, QuantizedTensor

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}
PRECISIONS = [
    Precision(dtype="int8"), Precision(dtype="int8", symmetric=False), Precision(dtype="int8", group_size=64),
    Precision(dtype="int4", group_size=32), Precision(dtype="int4", group_size=64, symmetric=False),
    Precision(dtype="int4", group_size=16), Precision(dtype="int3", group_size=32),
    Precision(dtype="int3", group_size=16, symmetric=False), Precision(dtype="int2", group_size=32),
    Precision(dtype="int2", group_size=64, symmetric=False),
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weight(p: Precision, out: int = 48, inn: int = 128, seed: int = 0) -> QuantizedTensor:
    return QuantizedTensor.from_float(torch.randn(out, inn, generator=gen(seed)) * 0.1, p)


def close(y: Tensor, ref: Tensor, dtype: torch.dtype, tol: float | None = None) -> None:
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs().max().item()
    tol = TOL[dtype] if tol is None else tol
    assert err <= tol * ref.abs().max().item(), f"max error {err:.3g} ({dtype})"


def reference(x: Tensor, qt: QuantizedTensor, bias: Tensor | None) -> Tensor:
    return F.linear(x.double(), qt.dequantize(torch.float64), None if bias is None else bias.double())


@pytest.mark.parametrize("p", PRECISIONS, ids=lambda p: p.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_op_matches_dequantized_linear(p: Precision, dtype: torch.dtype, with_bias: bool) -> None:
    qt = weight(p)
    x = torch.randn(2, 3 + DECODE_MAX_TOKENS, 128, generator=gen(1)).to(dtype)  # past decode sizes: x's precision
    bias = torch.randn(48, generator=gen(2)).to(dtype) if with_bias else None
    close(qt.linear(x, bias), reference(x, qt, bias), dtype)


@pytest.mark.parametrize("p", PRECISIONS, ids=lambda p: p.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [1, DECODE_MAX_TOKENS])
def test_decode_sized_float_inputs(p: Precision, dtype: torch.dtype, tokens: int) -> None:
    """Decode-sized float32/float16 inputs with gradients off: the packed kernels on bf16 where they fit (bf16
    tolerance, output in x's dtype), x's own precision elsewhere."""
    qt = weight(p, out=64)
    x = torch.randn(tokens, 128, generator=gen(12)).to(dtype)
    bias = torch.randn(64, generator=gen(13)).to(dtype)
    path = cpu_path(x, qt.scales, qt.minima, p.bits, tokens, inference=True)
    with torch.no_grad():
        y = qt.linear(x, bias)
    close(qt.linear(x, bias), reference(x, qt, bias), dtype)  # gradients on: x's precision
    assert path == ("int8pack" if p.bits == 8 and p.group_size is None and p.symmetric else
                    "int4pack" if p.bits <= 4 and p.group_size in (32, 64, 128) else "dequant")
    close(y, reference(x, qt, bias), dtype, TOL[torch.bfloat16] if path != "dequant" else None)


@pytest.mark.parametrize(
    ("p", "path"),
    [(Precision(dtype="int8"), "int8pack"), (Precision(dtype="int4", group_size=32), "int4pack"),
     (Precision(dtype="int4", group_size=128, symmetric=False), "int4pack"),
     (Precision(dtype="int3", group_size=64), "int4pack"), (Precision(dtype="int3", group_size=32, symmetric=False), "int4pack"),
     (Precision(dtype="int2", group_size=128, symmetric=False), "int4pack")],
    ids=["int8pack", "int4pack-sym", "int4pack-asym", "int3-sym", "int3-asym", "int2-asym"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_kernels_match(p: Precision, path: str, dtype: torch.dtype) -> None:
    qt = weight(p, out=32, inn=256)
    x = torch.randn(5, 256, generator=gen(3)).to(dtype)
    bias = torch.randn(32, generator=gen(4)).to(dtype)
    y = quant_linear_cpu(x, qt.codes, qt.scales, qt.minima, bias, p.bits, path)
    close(y, reference(x, qt, bias), dtype, TOL[torch.bfloat16])  # the packed kernels compute in bf16


def test_path_rule() -> None:
    q8, q4 = weight(Precision(dtype="int8")), weight(Precision(dtype="int4", group_size=32))
    xb, xf = torch.zeros(1, 128, dtype=torch.bfloat16), torch.zeros(1, 128)
    assert cpu_path(xb, q8.scales, q8.minima, 8, 1) == "int8pack"
    assert cpu_path(xb, q4.scales, q4.minima, 4, 256) == "int4pack"
    assert cpu_path(xb, q4.scales, q4.minima, 4, 512) == "dequant"  # prefill: dequantize-then-GEMM wins
    assert cpu_path(xf, q4.scales, q4.minima, 4, 1, inference=True) == "int4pack"  # fp32 decode: kernel on bf16 x
    assert cpu_path(xf, q8.scales, q8.minima, 8, DECODE_MAX_TOKENS, inference=True) == "int8pack"
    assert cpu_path(xf, q4.scales, q4.minima, 4, DECODE_MAX_TOKENS + 1, inference=True) == "dequant"  # prefill: fp32
    assert cpu_path(xf, q4.scales, q4.minima, 4, 1) == "dequant"  # gradients on (the op itself): fp32
    odd = weight(Precision(dtype="int4", group_size=32), out=40)  # out not a multiple of 16
    assert cpu_path(xb, odd.scales, odd.minima, 4, 1) == "dequant"
    g16 = weight(Precision(dtype="int4", group_size=16))  # group the kernel does not take
    assert cpu_path(xb, g16.scales, g16.minima, 4, 1) == "dequant"
    q3, q2 = weight(Precision(dtype="int3", group_size=64, symmetric=False)), weight(Precision(dtype="int2", group_size=32))
    assert cpu_path(xf, q3.scales, q3.minima, 3, 1, inference=True) == "int4pack"  # 3 and 2 bits: levels of the int4 kernel
    assert cpu_path(xb, q2.scales, q2.minima, 2, 1) == "int4pack"
    g8 = weight(Precision(dtype="int8", group_size=64))  # grouped int8: no kernel
    assert cpu_path(xb, g8.scales, g8.minima, 8, 1) == "dequant"


@pytest.mark.parametrize("inn", [24, 40])
def test_int8_inputs_whose_width_the_kernel_cannot_read_dequantize(inn: int) -> None:
    """The int8 packed kernel reads ``in`` in blocks of 16: at 24 or 40 it returned garbage (or crashed); those
    widths take the dequantize path, and a decode-sized call gives the dequantized product."""
    qt = weight(Precision(dtype="int8"), out=96, inn=inn)
    x = torch.randn(3, inn, generator=gen(14))
    assert cpu_path(x.bfloat16(), qt.scales, qt.minima, 8, 3) == "dequant"
    with torch.no_grad():
        y = qt.linear(x, None)
    close(y, reference(x, qt, None), torch.float32)


def test_int4_layout_cache_follows_in_place_updates() -> None:
    qt = weight(Precision(dtype="int4", group_size=32), out=32)
    x = torch.randn(2, 128, generator=gen(5)).bfloat16()
    first = quant_linear_cpu(x, qt.codes, qt.scales, qt.minima, None, 4, "int4pack")
    other = weight(Precision(dtype="int4", group_size=32), out=32, seed=9)
    qt.codes.copy_(other.codes)
    qt.scales.copy_(other.scales)
    second = quant_linear_cpu(x, qt.codes, qt.scales, qt.minima, None, 4, "int4pack")
    assert not torch.allclose(first, second)
    close(second, reference(x, other, None), torch.bfloat16)


def test_bad_inputs_name_the_op() -> None:
    qt = weight(Precision(dtype="int4", group_size=32))
    x = torch.randn(2, 128)
    ops = torch.ops.kronc
    with pytest.raises(OpInputError, match=r"kronc::quant_linear: codes for 4-bit values of a \(48, 128\) weight"):
        ops.quant_linear(x, qt.codes[:, :10], qt.scales, None, None, 4)
    with pytest.raises(OpInputError, match="bits must be one of"):
        ops.quant_linear(x, qt.codes, qt.scales, None, None, 5)
    with pytest.raises(OpInputError, match="scales must be fp16"):
        ops.quant_linear(x, qt.codes, qt.scales.float(), None, None, 4)
    with pytest.raises(OpInputError, match="not divisible into the 4 scale groups"):
        ops.quant_linear(torch.randn(2, 130), qt.codes, qt.scales, None, None, 4)
    with pytest.raises(OpInputError, match="path 'int4pack' cannot run"):
        q3 = weight(Precision(dtype="int3", group_size=16))
        quant_linear_cpu(x, q3.codes, q3.scales, None, None, 3, "int4pack")


def test_gradient_flows_to_input_and_bias() -> None:
    qt = weight(Precision(dtype="int3", group_size=32))
    x = torch.randn(4, 128, generator=gen(6), requires_grad=True)
    bias = torch.randn(48, generator=gen(7), requires_grad=True)
    qt.linear(x, bias).square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    F.linear(x2, qt.dequantize(), b2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4) and torch.allclose(bias.grad, b2.grad, atol=1e-4)


class Tiny(nn.Module):
    """Two quantized linears (int4 and int2) with a nonlinearity between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = weight(Precision(dtype="int4", group_size=32), out=64, inn=128)
        self.b = weight(Precision(dtype="int2", group_size=16, symmetric=False), out=32, inn=64)
        self.bias = nn.Parameter(torch.randn(32, generator=gen(8)))

    def forward(self, x: Tensor) -> Tensor:
        return self.b.linear(torch.relu(self.a.linear(x)), self.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_matches_eager(dtype: torch.dtype) -> None:
    m = Tiny().to(dtype)
    x = torch.randn(3, 128, generator=gen(9)).to(dtype)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="inductor")(x)
    assert torch.equal(compiled, eager)


def test_export_keeps_the_op() -> None:
    m = Tiny()
    x = torch.randn(3, 128, generator=gen(10))
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (x,), dynamic_shapes={"x": {0: batch}})
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.kronc.quant_linear.default) == 2
    x5 = torch.randn(5, 128, generator=gen(11))
    assert torch.equal(ep.module()(x5), m(x5))


def test_eager_calls_skip_the_op_dispatch_only_when_nothing_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    """`quant_linear_any` runs the CPU implementation directly for eager calls with gradients off (same result
    as the compiled graphs' ``kronc::quant_linear_infer``) and the op itself when gradients are on."""
    from kronc.codegen.ops import quant

    qt = weight(Precision(dtype="int4", group_size=32), out=32)
    x = torch.randn(1, 128, generator=gen(14))
    with torch.no_grad():
        via_op = torch.ops.kronc.quant_linear_infer(x, qt.codes, qt.scales, None, None, 4)
    calls: list[int] = []
    real = quant.quant_linear
    monkeypatch.setattr(quant, "quant_linear", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        assert torch.equal(qt.linear(x), via_op) and not calls
    qt.linear(x)
    assert calls == [1]


def test_compiled_inference_uses_the_lean_op_and_matches_eager() -> None:
    """Under torch.compile with gradients off, a decode-sized call is ``kronc::quant_linear_infer`` (same result
    as eager); with gradients on, the graph keeps ``kronc::quant_linear``."""
    from torch._dynamo.testing import CompileCounterWithBackend

    qt = weight(Precision(dtype="int3", group_size=64, symmetric=False), out=64)
    x = torch.randn(1, 1, 128, generator=gen(15))
    targets = []
    for grad in (False, True):
        counter = CompileCounterWithBackend("aot_eager")
        with torch.set_grad_enabled(grad):
            y = torch.compile(qt.linear, backend=counter, fullgraph=True)(x)
            assert torch.equal(y, qt.linear(x))
        targets.append({str(n.target).removesuffix(".default") for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"})
    assert targets == [{"kronc.quant_linear_infer"}, {"kronc.quant_linear"}]
