"""The ``kronc::quant_linear`` Triton kernel (dequantize inside the matmul) under the interpreter.

Compared with float64 math on the decoded weight, for int8 (per row and grouped), int4 and int2,
symmetric and with minima, float32/float16/bfloat16 activations, shapes that divide the
interpreter's 16-wide tiles and shapes that do not. Tolerance as in tests/codegen/test_triton_kernels.py:
``max|y - ref| <= tol * max|ref|`` with tol 1e-5 (float32), 3e-3 (float16), 3e-2 (bfloat16).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kronc.codegen import backend  # noqa: E402
from kronc.codegen.triton import _common, quant_matmul  # noqa: E402
from kronc.values import Precision, QuantizedTensor  # noqa: E402

if _common.is_interpreted(quant_matmul._quant_kernel):
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("no CUDA and triton was imported without TRITON_INTERPRET=1", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
CASES = [  # (precision, out, in, tokens)
    (Precision(dtype="int8"), 24, 40, 3),
    (Precision(dtype="int8", group_size=16, symmetric=False), 16, 64, 16),
    (Precision(dtype="int4", group_size=32), 20, 64, 5),
    (Precision(dtype="int4", group_size=16, symmetric=False), 32, 48, 17),
    (Precision(dtype="int2", group_size=32), 16, 96, 2),
    (Precision(dtype="int2", group_size=16, symmetric=False), 9, 32, 4),
]


def qweight(p: Precision, out: int, inn: int) -> QuantizedTensor:
    w = torch.randn(out, inn, generator=torch.Generator().manual_seed(out * inn)) * 0.1
    return QuantizedTensor.from_float(w, p).to(DEVICE)


@pytest.mark.parametrize("case", CASES, ids=[c[0].describe() for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quant_kernel_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    p, out, inn, tokens = case
    qt = qweight(p, out, inn)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, inn, generator=g).to(DEVICE, dtype)
    bias = torch.randn(out, generator=g).to(DEVICE, dtype)
    y = quant_matmul.quant_linear(x, qt.codes, qt.scales, qt.minima, bias, p.bits)
    w = qt.dequantize(dtype).double()  # the kernel casts the decoded tile to x's dtype, as here
    ref = F.linear(x.double(), w, bias.double())
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), f"max error {err:.3g}"


def test_op_dispatches_to_the_kernel() -> None:
    qt = qweight(Precision(dtype="int4", group_size=16), 16, 32)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with backend.use_kernels("triton"):
        y = qt.linear(x)
        with pytest.raises(backend.KernelUnavailable, match="not 3"):
            q3 = qweight(Precision(dtype="int3", group_size=16), 16, 32)
            q3.linear(x)
    ref = F.linear(x.double(), qt.dequantize(torch.float64))
    assert y.shape == (2, 3, 16) and (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
