"""Input checks of ``kronc::quant_linear`` (shared by the torch op and the Triton kernel)."""

from __future__ import annotations

import torch
from torch import Tensor

from .common import check_bias, check_input, fail, shape

BITS = (8, 4, 3, 2)
INT4_GROUPS = (32, 64, 128)
_UNIT_BYTES = {8: (1, 1), 4: (2, 1), 3: (8, 3), 2: (4, 1)}


def level_offset(bits: int, symmetric: bool) -> int:
    """Smallest stored level: ``-(2^(b-1)-1)`` when symmetric, ``0`` otherwise (see `kronc.values.grid`)."""
    return -(2 ** (bits - 1) - 1) if symmetric else 0


def check_quant(op: str, x: Tensor, codes: Tensor, scales: Tensor, minima: Tensor | None,
                bias: Tensor | None, bits: int) -> tuple[int, int]:
    """Validate a quantized linear; returns ``(out_features, group_size)``."""
    check_input(op, x)
    if bits not in BITS:
        raise fail(op, f"bits must be one of {list(BITS)}, got {bits}")
    if scales.dim() != 2 or scales.dtype != torch.float16:
        raise fail(op, f"scales must be fp16 (out, groups), got {scales.dtype} {shape(scales)}")
    out, groups = scales.shape
    inn = x.shape[-1]
    if groups == 0 or inn % groups:
        raise fail(op, f"x has {inn} features, not divisible into the {groups} scale groups per row")
    per, nbytes = _UNIT_BYTES[bits]
    want = (out, -(-inn // per) * nbytes)
    want_dtype = torch.int8 if bits == 8 else torch.uint8
    if shape(codes) != want or codes.dtype != want_dtype:
        raise fail(op, f"codes for {bits}-bit values of a ({out}, {inn}) weight must be {want_dtype} {want}, "
                       f"got {codes.dtype} {shape(codes)}")
    if minima is not None and (shape(minima) != (out, groups) or minima.dtype != torch.float16):
        raise fail(op, f"minima must be fp16 {(out, groups)} like scales, got {minima.dtype} {shape(minima)}")
    for name, t in (("codes", codes), ("scales", scales), ("minima", minima), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise fail(op, f"{name} is on {t.device} but x is on {x.device}")
    if bias is not None and bias.dtype != x.dtype:
        raise fail(op, f"bias has dtype {bias.dtype} but x has {x.dtype}")
    check_bias(op, bias, out)
    return out, inn // groups
