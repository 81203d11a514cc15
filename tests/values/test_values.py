"""The value codec (`kronc.values`): exact bytes, packing, exact round trips, fits, joint fits.

Exact-structure inputs come back exact: a tensor already on a precision's grid (made by decoding an
encoding) is fitted with zero error by every fit. Fits that claim to reduce an error are compared with
round-to-nearest on inputs where they must win (GPTQ on correlated calibration inputs, the data-free
fit on heavy-tailed weights, the joint fit on a grid matrix plus a low-rank term).
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from kronc.reference.pack import pack, unpack
from kronc.values import (
    Precision,
    PrecisionError,
    QuantizedTensor,
    decode,
    encode,
    fit_clip,
    fit_gptq,
    fit_hqq,
    fit_joint,
    fit_rtn,
)
from kronc.values.grid import grouped

PRECISIONS = [
    Precision(dtype="fp32"), Precision(dtype="bf16"), Precision(dtype="fp16"),
    Precision(dtype="int8"), Precision(dtype="int8", symmetric=False), Precision(dtype="int8", group_size=32),
    Precision(dtype="int4", group_size=16), Precision(dtype="int4", group_size=32, symmetric=False),
    Precision(dtype="int4", group_size=128), Precision(dtype="int3", group_size=16),
    Precision(dtype="int3", group_size=64, symmetric=False), Precision(dtype="int2", group_size=32),
    Precision(dtype="int2", group_size=16, symmetric=False), Precision(dtype="int3", symmetric=False),
    Precision(dtype="int4"), Precision(dtype="int2", symmetric=False),  # one scale per row
]
SHAPES = [(8, 128), (3, 5, 256), (384,), (1, 128)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def names(ps: list[Precision]) -> list[str]:
    return [p.describe() for p in ps]


@pytest.mark.parametrize("p", PRECISIONS, ids=names(PRECISIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_nbytes_read_off_buffers(p: Precision, shape: tuple[int, ...]) -> None:
    qt = QuantizedTensor.from_float(torch.randn(*shape, generator=gen(0)), p)
    assert qt.nbytes() == p.nbytes(shape) == qt.encoded().nbytes()
    assert qt.dequantize().shape == shape
    if not p.is_float:  # value bytes are exactly bits/8 per value plus 2 bytes per scale (and minimum)
        rows, inn = p.check_shape(shape)
        per_group = 2 if p.symmetric else 4
        assert p.nbytes(shape) == rows * inn * p.bits // 8 + rows * p.groups(shape) * per_group


def test_nbytes_known_values() -> None:
    assert Precision(dtype="int4", group_size=32).nbytes((576, 576)) == 576 * 288 + 576 * 18 * 2
    assert Precision(dtype="int3", group_size=64, symmetric=False).nbytes((2, 64)) == 2 * 24 + 2 * 4
    assert Precision(dtype="int8").nbytes((10, 7)) == 70 + 20
    assert Precision(dtype="bf16").nbytes((10, 7)) == 140


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("lo_kind", ["signed", "unsigned"])
@pytest.mark.parametrize("inn", [16, 40, 7])
def test_pack_roundtrip(bits: int, lo_kind: str, inn: int) -> None:
    lo = -(2 ** (bits - 1) - 1) if lo_kind == "signed" else 0
    q = torch.randint(lo, lo + 2**bits - (1 if lo < 0 else 0), (5, inn), generator=gen(bits))
    codes = pack(q, bits, lo)
    assert codes.shape[1] == {8: inn, 4: -(-inn // 2), 3: -(-inn // 8) * 3, 2: -(-inn // 4)}[bits]
    assert torch.equal(unpack(codes, bits, lo, inn), q.int())


def test_int3_layout_is_24_bit_words() -> None:
    q = torch.arange(8).reshape(1, 8)  # unsigned levels 0..7, one unit
    word = sum(i << (3 * i) for i in range(8))
    assert pack(q, 3, 0).tolist() == [[word & 255, (word >> 8) & 255, word >> 16]]


def grid_tensor(p: Precision, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor on ``p``'s grid: the decoding of an encoding of random data."""
    rtn = p.model_copy(update={"fit": "rtn"})
    return decode(encode(torch.randn(*shape, generator=gen(seed)) * 0.05, rtn))


INT_PRECISIONS = [p for p in PRECISIONS if not p.is_float]


@pytest.mark.parametrize("p", PRECISIONS, ids=names(PRECISIONS))
@pytest.mark.parametrize("fit", ["rtn", "hqq", "gptq"])
def test_grid_tensor_comes_back_exact(p: Precision, fit: str) -> None:
    p = p.model_copy(update={"fit": fit})
    w = grid_tensor(p, (16, 128))
    x = torch.randn(64, 128, generator=gen(3))
    h = x.T @ x
    again = decode(encode(w, p, h))
    assert torch.equal(again, w), f"{p.describe()}: max error {(again - w).abs().max():.3g}"


@pytest.mark.parametrize("p", INT_PRECISIONS, ids=names(INT_PRECISIONS))
def test_rtn_error_within_half_step(p: Precision) -> None:
    w = torch.randn(8, 128, generator=gen(1))
    lv = fit_rtn(w, p)
    step = lv.scale[..., None]
    assert ((lv.values() - grouped(w, p)).abs() <= step / 2 + 1e-6).all()


def test_float_precisions_are_casts() -> None:
    w = torch.randn(4, 16, generator=gen(2))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        qt = QuantizedTensor.from_float(w, Precision(dtype=name))
        assert qt.codes.dtype == dtype and torch.equal(qt.dequantize(), w.to(dtype).float())


def test_describe() -> None:
    assert Precision(dtype="int4", group_size=32, symmetric=False).describe() == "int4g32a"
    assert Precision(dtype="int3", group_size=64, fit="gptq").describe() == "int3g64-gptq"
    assert Precision(dtype="int8").describe() == "int8" and Precision(dtype="bf16").describe() == "bf16"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"dtype": "int4", "group_size": 48}, "group_size must be one of [16, 32, 64, 128]"),
        ({"dtype": "bf16", "group_size": 32}, "group_size must be None for float dtype 'bf16'"),
        ({"dtype": "int5", "group_size": 32}, "dtype"),
        ({"dtype": "int4", "group_size": 32, "bits": 4}, "bits"),
    ],
)
def test_bad_precision_is_a_clear_error(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=pytest.importorskip("re").escape(needle)):
        Precision(**kwargs)


def test_shape_that_cannot_take_a_precision() -> None:
    p = Precision(dtype="int4", group_size=64)
    with pytest.raises(PrecisionError, match=r"group_size=64 does not divide the last dimension 96 .* \[16, 32\]"):
        p.nbytes((4, 96))
    with pytest.raises(PrecisionError, match="needs the calibration Gram matrix"):
        encode(torch.randn(4, 64), Precision(dtype="int4", group_size=32, fit="gptq"))
    with pytest.raises(PrecisionError, match=r"H must be \(64, 64\)"):
        encode(torch.randn(4, 64), Precision(dtype="int4", group_size=32, fit="gptq"), torch.eye(32))


@pytest.mark.parametrize("p", [Precision(dtype="int4", group_size=32), Precision(dtype="int3", group_size=16, symmetric=False),
                               Precision(dtype="int8")], ids=lambda p: p.describe())
def test_gptq_beats_rtn_on_output_error(p: Precision) -> None:
    g = gen(4)
    w = torch.randn(32, 128, generator=g)
    mix = torch.randn(128, 128, generator=g) / 128**0.5 + torch.eye(128)  # correlated features
    x = torch.randn(512, 128, generator=g) @ mix
    h = x.T @ x

    def out_err(lv: object) -> float:
        return float(((w - lv.values().reshape(w.shape)) @ x.T).norm())  # type: ignore[attr-defined]

    assert out_err(fit_gptq(w, p, h)) < 0.9 * out_err(fit_rtn(w, p))


@pytest.mark.parametrize("p", [Precision(dtype="int4", group_size=32), Precision(dtype="int4", group_size=64, symmetric=False),
                               Precision(dtype="int2", group_size=32, symmetric=False)], ids=lambda p: p.describe())
def test_data_free_fit_beats_rtn_on_heavy_tails(p: Precision) -> None:
    w = torch.distributions.StudentT(3.0).sample((64, 256))
    wg = grouped(w, p)
    rtn = float((fit_rtn(w, p).values() - wg).norm())
    clip = float((fit_clip(w, p).values() - wg).norm())
    hqq = float((fit_hqq(w, p).values() - wg).norm())
    assert hqq <= clip < rtn and hqq < 0.99 * rtn


def test_quantized_tensor_state_and_dtype_casts() -> None:
    p = Precision(dtype="int4", group_size=32, symmetric=False)
    qt = QuantizedTensor.from_float(torch.randn(16, 64, generator=gen(5)), p)
    before = qt.dequantize()
    qt.float().double().half()  # dtype casts keep the stored precision
    assert qt.codes.dtype == torch.uint8 and qt.scales.dtype == torch.float16 and qt.minima.dtype == torch.float16
    assert set(qt.state_dict()) == {"codes", "scales", "minima"}
    other = QuantizedTensor.from_float(torch.zeros(16, 64), p)
    other.load_state_dict(qt.state_dict())
    assert torch.equal(other.dequantize(), before)


@pytest.mark.slow
def test_joint_recovers_grid_plus_low_rank() -> None:
    """A low-rank term below the grid step (the regime of a correction of quantization error) is
    recovered by the alternation; RTN alone rounds it into the grid."""
    p = Precision(dtype="int3", group_size=32)
    q0 = grid_tensor(p, (64, 128), seed=6)
    g = gen(7)
    lr = 0.002 * torch.randn(64, 4, generator=g) @ torch.randn(4, 128, generator=g)
    w = q0 + lr
    fitted = fit_joint(w, p, rank=4, iters=6)
    rtn_err = float((decode(encode(w, p)) - w).norm())
    joint_err = float((fitted.to_dense() - w).norm())
    assert joint_err < 0.1 * rtn_err
    assert all(b <= a for a, b in zip(fitted.errors, fitted.errors[1:], strict=False)) and len(fitted.errors) == 6
    assert fitted.left.shape == (64, 4) and fitted.right.shape == (4, 128)


@pytest.mark.slow
def test_joint_data_aware_reduces_output_error() -> None:
    g = gen(8)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3.0, 64)  # uneven input scales
    h = x.T @ x
    p = Precision(dtype="int2", group_size=32, fit="gptq")
    plain = fit_joint(w, p.model_copy(update={"fit": "rtn"}), rank=8, iters=3)
    aware = fit_joint(w, p, rank=8, h=h, iters=3)

    def out_err(f: object) -> float:
        return float(((w - f.to_dense()) @ x.T).norm())  # type: ignore[attr-defined]

    assert out_err(aware) < out_err(plain)
    lqer = fit_joint(w, p, rank=8, h=h, iters=1)  # the first iterate: quantize, then correct
    assert out_err(aware) <= out_err(lqer) * (1 + 1e-6)
    with pytest.raises(PrecisionError, match="rank must lie in"):
        fit_joint(w, p, rank=100, h=h)
