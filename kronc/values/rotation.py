"""Incoherence processing: a randomized blockwise Hadamard rotation along the input dimension.

Quantizing ``W R`` instead of ``W`` (``R`` orthogonal) spreads a row's outliers over its block, so
groups of values are closer to Gaussian and their scales waste fewer levels (QuIP#, QuaRot, HIGGS).
At run time ``y = (x R) @ Q(W R)ᵀ`` since ``R Rᵀ = I``.

``R = diag(s) · blockdiag(H_b / sqrt(b), ...)``: ``s`` are random signs, ``H_b`` the Sylvester
Hadamard matrix of the largest power-of-two block ``b`` that divides the input dimension (64 for
576, 512 for 1536, 128 for 384). The signs are a pure function of ``(in, seed)`` (a 32-bit hash of
each index, not torch's generator, so they do not change with the torch version or device): only
the seed would ever need storing, and with the fixed `SEED` nothing does.

The signs and Hadamard matrices are built from tensor ops, so ``torch.compile`` traces them as a handful
of ops; eager calls reuse them from a small cache keyed by size, dtype and device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

SEED = 0x6B726F6E  # "kron"
"""The fixed seed of the rotation's signs."""
FULL = False
"""Which transform `rotate` applies by default: False, block-diagonal Sylvester Hadamard blocks of the
largest power of two dividing the input dimension; True, one block over as much of the dimension as
Kronecker factors of 12 (Paley) and powers of two cover (576 = 12·12·4, 1536 = 12·128, 384 = 12·32)."""
_M32 = 0xFFFFFFFF


def _mul32(x: Any, c: int) -> Any:
    """``x * c mod 2^32`` for 32-bit ``x`` (a Python int or an int64 tensor) without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: Any) -> Any:
    """A 32-bit integer hash (Wellons' lowbias32), the same on Python ints and int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def block_size(inn: int) -> int:
    """The largest power of two dividing ``inn`` (the Hadamard block)."""
    if inn <= 0:
        raise ValueError(f"rotation: the input dimension must be positive, got {inn}")
    return inn & -inn


MAX_FACTOR = 64
"""Largest Sylvester factor applied as one matmul: a block of ``2^k`` is applied as the Kronecker product
of factors of at most 64 (``H_512 = H_8 ⊗ H_64`` exactly, Sylvester's construction being a Kronecker
power of ``H_2``), 72 multiply-adds per value instead of 512."""


def factors(inn: int, full: bool = FULL) -> tuple[int, ...]:
    """The Hadamard orders whose Kronecker product is one diagonal block of ``R``: the `block_size` ``b``
    split into powers of two of at most `MAX_FACTOR` (512 -> (8, 64)); with ``full``, also a factor 12
    (Paley's Hadamard matrix) for every 12 that divides ``inn`` (576 = 12·12·4, one block; 1536 =
    12·128; 384 = 12·32)."""
    out: list[int] = []
    block_size(inn)  # validates
    m = inn
    while full and m % 12 == 0:
        out.append(12)
        m //= 12
    b = block_size(m)
    pow2 = []
    while b > MAX_FACTOR:
        pow2.append(MAX_FACTOR)
        b //= MAX_FACTOR
    return (*out, *([b] if b > 1 or not (out or pow2) else []), *pow2)


_CACHE: dict[tuple[Any, ...], Tensor] = {}


def _cached(key: tuple[Any, ...], build: Callable[[], Tensor]) -> Tensor:
    """``build()``, kept per ``key`` in eager mode (traced graphs build it inline: no global state)."""
    if torch.compiler.is_compiling():
        return build()
    found = _CACHE.get(key)
    if found is None:
        found = _CACHE[key] = build()
    return found


def signs(inn: int, seed: int = SEED, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The ``±1`` diagonal of ``R`` for input dimension ``inn``: the top bit of a 32-bit hash of each index
    (tensor ops only, so a traced graph computes it in a few ops instead of unrolling a loop)."""
    def build() -> Tensor:
        i = torch.arange(inn, dtype=torch.int64, device=device)
        h = _hash32((i + _hash32(seed & _M32)) & _M32)
        return ((h >> 31) * 2 - 1).to(dtype)

    return _cached(("signs", inn, seed, dtype, str(device)), build)


def _paley12() -> Tensor:
    """Paley's Hadamard matrix of order 12 (q = 11): ``I + [[0, 1ᵀ], [-1, Q]]``, ``Q`` the Jacobsthal matrix."""
    q = 11
    chi = [0] + [1 if pow(a, (q - 1) // 2, q) == 1 else -1 for a in range(1, q)]
    s = torch.zeros(12, 12, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    s[1:, 1:] = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    return torch.eye(12, dtype=torch.float64) + s


def hadamard(b: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The normalized ``(b, b)`` Hadamard matrix (orthogonal, entries ``±1/sqrt(b)``): Sylvester's for a
    power of two (symmetric), Paley's for 12 (not symmetric)."""
    if b != 12 and (b <= 0 or b & (b - 1)):
        raise ValueError(f"rotation: the Hadamard order must be a power of two or 12, got {b}")

    def build() -> Tensor:
        if b == 12:
            return (_paley12() / math.sqrt(12)).to(dtype=dtype, device=device)
        h = torch.ones(1, 1, dtype=dtype, device=device)
        while h.shape[0] < b:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h * (1.0 / math.sqrt(b))

    return _cached(("hadamard", b, dtype, str(device)), build)


def matrix(inn: int, seed: int = SEED, full: bool = FULL, dtype: torch.dtype = torch.float64) -> Tensor:
    """``R`` as a dense ``(inn, inn)`` matrix (for tests)."""
    block = torch.ones(1, 1, dtype=dtype)
    for f in factors(inn, full):
        block = torch.kron(block, hadamard(f, dtype))
    return signs(inn, seed, dtype)[:, None] * torch.block_diag(*[block] * (inn // block.shape[0]))


def _apply(x: Tensor, fs: tuple[int, ...], transpose: bool) -> Tensor:
    """``x`` times the block-diagonal Kronecker product of the Hadamard matrices ``fs`` (or its transpose)."""
    shape, k = x.shape, len(fs)
    y = x.reshape(*shape[:-1], -1, *fs)
    for i, f in enumerate(fs):
        h = hadamard(f, x.dtype, x.device)
        axis = y.dim() - k + i
        y = (y.movedim(axis, -1) @ (h.T if transpose else h)).movedim(-1, axis)
    return y.reshape(shape)


def rotate(x: Tensor, seed: int = SEED, full: bool = FULL) -> Tensor:
    """``x @ R`` along the last dimension (activations, or the rows of a weight ``(out, in)``)."""
    inn = x.shape[-1]
    return _apply(x * signs(inn, seed, x.dtype, x.device), factors(inn, full), transpose=False)


def unrotate(x: Tensor, seed: int = SEED, full: bool = FULL) -> Tensor:
    """``x @ Rᵀ`` along the last dimension (the inverse of `rotate`)."""
    inn = x.shape[-1]
    return _apply(x, factors(inn, full), transpose=True) * signs(inn, seed, x.dtype, x.device)


def rotate_gram(h: Tensor, seed: int = SEED, full: bool = FULL) -> Tensor:
    """``Rᵀ H R`` for a Gram matrix ``H = Xᵀ X`` of the inputs (the Gram matrix of ``X R``)."""
    return rotate(rotate(h, seed, full).transpose(-1, -2), seed, full).transpose(-1, -2)
