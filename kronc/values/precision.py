"""`Precision`: how many bits each stored value of a tensor takes, and how those values are fitted.

Every format stores one or more floating-point tensors (a dense weight, low-rank or Kronecker
factors, sparse-overlay values). Each can be kept as a float (fp32, bf16, fp16: a cast) or as
integers with scales: int8 with one scale per row (or per group), int4/int3/int2 with a scale, and
optionally a minimum, per group of ``group_size`` values along the last (input) dimension (or per
row). Scales and minima are fp16. A tensor of any shape ``(..., in)`` is treated as ``prod(...)`` rows of ``in``
values, so ``nbytes`` is exact for factors and 1-D value lists alike.

An integer precision may also be *rotated* (``rotate``): the values stored are those of ``W R``, ``R``
a fixed randomized Hadamard transform along the input dimension (`kronc.values.rotation`), which
spreads outliers so groups quantize better; decoding un-rotates, and a linear layer rotates its input
instead (``y = (x R) Q(W R)ᵀ``). The transform is derived from the input dimension and a fixed seed,
so it costs no stored bytes.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer, model_validator

ValueDtype = Literal["fp32", "bf16", "fp16", "int8", "int4", "int3", "int2"]
Fit = Literal["rtn", "hqq", "gptq"]

FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
INT_BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
GROUP_SIZES = (16, 32, 64, 128)
SCALE_BYTES = 2  # scales and minima are fp16


class PrecisionError(ValueError):
    """A tensor shape cannot take a precision (names the field and the allowed values)."""


class Precision(BaseModel):
    """Bits per stored value of one tensor, the grouping of its scales, and the fit that picks values."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    dtype: ValueDtype = "fp32"
    """Stored value type: a float (kept by a cast) or a signed integer grid with fp16 scales."""
    group_size: int | None = None
    """Values sharing one scale along the last dim: 16, 32, 64 or 128, or None = one scale per row (the
    only choice for floats, which have no scales). Smaller groups cost more scale bytes and fit better;
    per-row scales suit int8, and rotated sub-byte grids, whose rows the rotation has made even."""
    symmetric: bool = True
    """True: ``w = q * scale`` with ``q`` in ``[-(2^(b-1)-1), 2^(b-1)-1]``; False: ``w = u * scale + min``
    with ``u`` in ``[0, 2^b - 1]`` and an fp16 minimum per group (2 more bytes per group)."""
    fit: Fit = "rtn"
    """How integer values are chosen: round to nearest; ``hqq`` (data-free: searched clipping range,
    plus HQQ's half-quadratic zero-point fit when asymmetric); ``gptq`` (error-compensating rounding
    that needs the calibration Gram matrix ``H = X^T X``). Ignored for float dtypes."""
    rotate: bool = False
    """Integer dtypes only: store ``W R`` (``R`` the fixed randomized Hadamard rotation of the input
    dimension, `kronc.values.rotation`) and rotate the layer's input at run time. Same bytes; it
    spreads outlier values over a Hadamard block, which helps most at 3 and 2 bits (measured in
    ``benchmarks/results/rotation.md``). Only the dense format's weight takes it."""

    @model_validator(mode="after")
    def _check(self) -> Precision:
        if self.is_float:
            if self.group_size is not None:
                raise ValueError(f"group_size must be None for float dtype {self.dtype!r}, got {self.group_size}")
            if self.rotate:
                raise ValueError(f"rotate applies to integer dtypes (int8/int4/int3/int2), not to the float cast {self.dtype!r}")
            return self
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {list(GROUP_SIZES)} or None, got {self.group_size}")
        return self

    @model_serializer(mode="wrap")
    def _drop_default_rotate(self, handler: SerializerFunctionWrapHandler) -> dict:
        """Policies, plans and saved models written before rotation existed stay byte-identical."""
        out = handler(self)
        if isinstance(out, dict) and out.get("rotate", True) is False:
            out.pop("rotate")
        return out

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_BYTES

    @property
    def bits(self) -> int:
        """Bits per stored value (not counting scales)."""
        return 8 * FLOAT_BYTES[self.dtype] if self.is_float else INT_BITS[self.dtype]

    def describe(self) -> str:
        """Short name: ``fp32``, ``bf16``, ``int8``, ``int4g32``, ``int4g32a`` (asymmetric), ``int3g64-gptq``,
        ``int3g64a-hqq-rot`` (rotated)."""
        if self.is_float:
            return self.dtype
        name = self.dtype + (f"g{self.group_size}" if self.group_size else "") + ("" if self.symmetric else "a")
        name = name if self.fit == "rtn" else f"{name}-{self.fit}"
        return name + "-rot" if self.rotate else name

    def check_shape(self, shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
        """``(rows, in)`` of a tensor of this shape, or a `PrecisionError` saying why it cannot be stored."""
        shape = tuple(int(s) for s in shape)
        if len(shape) == 0:
            raise PrecisionError(f"precision {self.describe()}: a 0-d tensor has no last dimension to group")
        rows, inn = math.prod(shape[:-1]), shape[-1]
        if self.group_size is not None and inn % self.group_size:
            allowed = [g for g in GROUP_SIZES if inn % g == 0]
            raise PrecisionError(
                f"precision {self.describe()}: group_size={self.group_size} does not divide the last dimension "
                f"{inn} of shape {shape}; allowed group sizes for it: {allowed or 'none'}"
            )
        return rows, inn

    def groups(self, shape: tuple[int, ...] | list[int]) -> int:
        """Scale groups per row."""
        _, inn = self.check_shape(shape)
        return 1 if self.group_size is None else inn // self.group_size

    def nbytes(self, shape: tuple[int, ...] | list[int]) -> int:
        """Exact stored bytes of a tensor of ``shape``: packed values + fp16 scales (+ fp16 minima)."""
        rows, inn = self.check_shape(shape)
        if self.is_float:
            return rows * inn * FLOAT_BYTES[self.dtype]
        value_bytes = rows * packed_row_bytes(inn, self.bits)
        per_group = SCALE_BYTES * (1 if self.symmetric else 2)
        return value_bytes + rows * self.groups(shape) * per_group


def packed_row_bytes(inn: int, bits: int) -> int:
    """Bytes of one packed row of ``inn`` values: 8 bits 1 byte each; 4 bits 2 per byte; 2 bits 4 per
    byte; 3 bits 8 values in 3 bytes (rows padded to whole packing units)."""
    per_unit = {8: (1, 1), 4: (2, 1), 3: (8, 3), 2: (4, 1)}[bits]
    return math.ceil(inn / per_unit[0]) * per_unit[1]


FP32 = Precision()
