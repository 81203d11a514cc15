"""Bit packing of grid levels into bytes, row by row (rows stay byte-aligned).

Stored code ``u = q - lo`` is unsigned in ``[0, 2^b)``, except int8, which keeps the signed level
(symmetric) or ``u - 128`` (asymmetric) as ``torch.int8`` so the int8 kernel reads it as is.

* int4: 2 values per byte, value ``2j`` in the low nibble, ``2j+1`` in the high nibble.
* int2: 4 values per byte, value ``4j+i`` in bits ``2i..2i+1``.
* int3: 8 values in 3 bytes: the 24-bit little-endian word ``sum_i u[8j+i] << 3i``. Chosen over 10 per
  int32 (3.2 bits/value) because it wastes no bits and group sizes (multiples of 16) divide evenly.
"""

from __future__ import annotations

import torch
from torch import Tensor

_UNIT = {4: 2, 2: 4, 3: 8}


def _int8_shift(lo: int) -> int:
    """int8 codes are the signed level itself (symmetric) or ``u - 128`` (asymmetric, ``lo = 0``)."""
    return 0 if lo < 0 else lo + 128


def pack(q: Tensor, bits: int, lo: int) -> Tensor:
    """Levels ``q`` (int, ``(rows, in)``, in ``[lo, lo + 2^bits)``) as packed bytes ``(rows, packed)``."""
    if bits == 8:
        return (q - _int8_shift(lo)).to(torch.int8)
    u = (q - lo).to(torch.int32)
    rows, inn = u.shape
    unit = _UNIT[bits]
    pad = (-inn) % unit
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(rows, -1, unit)
    shifts = torch.arange(unit, dtype=torch.int32, device=u.device) * bits
    word = (u << shifts).sum(-1, dtype=torch.int32)  # (rows, units)
    if bits != 3:
        return word.to(torch.uint8)
    return torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], -1).reshape(rows, -1).to(torch.uint8)


def unpack(codes: Tensor, bits: int, lo: int, inn: int) -> Tensor:
    """Inverse of `pack`: int32 levels ``(rows, inn)``."""
    if bits == 8:
        return codes.to(torch.int32) + _int8_shift(lo)
    rows = codes.shape[0]
    if bits == 3:
        c = codes.to(torch.int32).reshape(rows, -1, 3)
        word = c[..., 0] | (c[..., 1] << 8) | (c[..., 2] << 16)
        shifts = torch.arange(8, dtype=torch.int32, device=codes.device) * 3
        u = ((word[..., None] >> shifts) & 7).reshape(rows, -1)
    else:  # byte-wise on uint8 (a quarter of the memory traffic of int32)
        u = torch.stack([(codes >> s) & ((1 << bits) - 1) for s in range(0, 8, bits)], -1).reshape(rows, -1)
    return u[:, :inn].to(torch.int32) + lo
